"""Dev evaluation during training: fused-head predictions on every rank, gathered into metrics."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader

from mllm_mer.config import RunConfig
from mllm_mer.data.schema import Sample
from mllm_mer.logs import progress, say
from mllm_mer.metrics import classification_metrics
from mllm_mer.training.summary import append_dev_row


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: DataLoader, accelerator: Accelerator, cfg: RunConfig, samples: list[Sample]
) -> dict:
    """Fused-head predictions on `loader` -> accuracy, weighted F1, per-subset accuracy (all ranks)."""
    model.eval()
    by_id = {s.id: s for s in samples}
    ids: list[str] = []
    preds: list[int] = []
    losses: list[float] = []
    for batch in progress(loader, desc="dev", unit="batch", leave=False, enabled=accelerator.is_main_process):
        out = model(batch)
        pred = out.cls_logits["fused"].argmax(dim=-1)
        ids.extend(batch["sample_ids"])
        preds.extend(pred.tolist())
        if out.loss is not None:
            losses.append(float(out.loss))
    model.train()
    ids = gather_object(ids)
    preds = gather_object(preds)
    seen: dict[str, int] = {}
    for sid, p in zip(ids, preds, strict=True):
        seen.setdefault(sid, p)  # ranks may repeat samples to even out the last batch
    labels = list(cfg.data.labels)
    y_true = [by_id[s].label for s in seen]
    y_pred = [labels[p] for p in seen.values()]
    metrics = classification_metrics(y_true, y_pred, labels, [by_id[s].subset for s in seen])
    metrics["loss"] = float(sum(losses) / len(losses)) if losses else None
    return metrics


def report_dev(model, dev_dl, accelerator: Accelerator, cfg: RunConfig, samples: list[Sample], step: int,
               writer) -> dict:
    """Dev metrics on every rank; the main process prints them and writes them to TensorBoard and
    `<output_dir>/dev_log.jsonl` (the end-of-run summary and `curves.png` read it)."""
    m = evaluate(model, dev_dl, accelerator, cfg, samples)
    if accelerator.is_main_process:
        subsets = " ".join(f"{k}={v['accuracy']:.3f}" for k, v in m["per_subset"].items())
        say(f"[dev step {step}] accuracy={m['accuracy']:.3f} weighted_f1={m['weighted_f1']:.3f} {subsets}")
        append_dev_row(cfg.train.output_dir, step, m)
        writer.add_scalar("dev/accuracy", m["accuracy"], step)
        writer.add_scalar("dev/weighted_f1", m["weighted_f1"], step)
        for k, v in m["per_subset"].items():
            writer.add_scalar(f"dev/accuracy_{k}", v["accuracy"], step)
    return m
