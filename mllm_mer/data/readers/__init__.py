"""Readers from public MER dataset layouts into `list[Sample]`, one module per dataset.

Every reader validates as it goes and raises `ValueError` naming the file and the line (CSV / text /
JSONL) or record (JSON list) of the first bad row: missing columns, unknown labels, duplicate ids,
missing media, and media paths that escape the dataset root (`..`, absolute paths elsewhere, symlinks
pointing outside; see `mllm_mer.data.paths.resolve_inside`). Labels are compared after
`.strip().lower()`. Media files are looked up with the extensions `.mp4` then `.avi`. Sample paths are
absolute and resolved. The same row rules without media (for evaluation references) are public:
`mer2023_label_rows`, `dfew_label_rows` and, for any CSV keyed by a sample name, `named_csv_rows`.

Modules (each docstring gives its layout, all paths relative to the `root` / `media_root` argument):

- `common.py`: the shared row rules (CSV rows, media lookup inside the root, label check,
  `sample_name`, duplicate ids, `named_csv_rows`);
- `mer2023.py`: `read_mer2023`, `mer2023_label_rows`;
- `dfew.py`: `read_dfew`, `dfew_label_rows`, `dfew_id`;
- `emer.py`: `read_emer_v1`, `read_emer_v2`, `read_ov_labels` and `split_openset_cell` (MERTools'
  list-string rule for `openset` cells);
- `camer.py`: `read_camer` with its `CAMERLayout`;
- `chat.py`: `read_sharegpt` (LLaMA-Factory) and `read_swift_jsonl` (ms-swift), `label_from_answer`.
"""

from mllm_mer.data.readers.camer import CAMERLayout, read_camer
from mllm_mer.data.readers.chat import label_from_answer, read_sharegpt, read_swift_jsonl
from mllm_mer.data.readers.common import MEDIA_EXTENSIONS, named_csv_rows, sample_name
from mllm_mer.data.readers.dfew import DFEW_LABELS, dfew_id, dfew_label_rows, read_dfew
from mllm_mer.data.readers.emer import read_emer_v1, read_emer_v2, read_ov_labels, split_openset_cell
from mllm_mer.data.readers.mer2023 import MER2023_SPLITS, mer2023_label_rows, read_mer2023

__all__ = [
    "DFEW_LABELS",
    "MEDIA_EXTENSIONS",
    "MER2023_SPLITS",
    "CAMERLayout",
    "dfew_id",
    "dfew_label_rows",
    "label_from_answer",
    "mer2023_label_rows",
    "named_csv_rows",
    "read_camer",
    "read_dfew",
    "read_emer_v1",
    "read_emer_v2",
    "read_mer2023",
    "read_ov_labels",
    "read_sharegpt",
    "read_swift_jsonl",
    "sample_name",
    "split_openset_cell",
]
