"""DCR (after "To Fuse or to Drop?", 2026): unimodal paths, AFD distillation and the ADA arbiter.

`config.py` (the `dcr.*` settings), `collate.py` (unimodal sub-batches), `paths.py` (path adapters, heads,
forward, losses), `afd.py` (Path I, evidence distillation), `ada.py` (Path II, the LinUCB arbiter),
`report.py` (fuse-or-drop baselines). Nothing is imported here: `mllm_mer.config` imports `config.py`,
which must not pull in the model code.
"""
