"""The thinker's 3-D (TMRoPE) position ids of a batch, computed once per distinct row and then reused.

The thinker computes them on every forward (`get_rope_index`: a Python loop over each row's tokens and
media), although a row's position ids depend only on that row: its tokens (prompt layout + answer), its
video's grid and seconds per grid, its audio's feature length, and the batch's `use_audio_in_video` switch.
With the frozen-encoder cache every epoch repeats the same rows, so `RopePositions` computes each distinct
row once, with the thinker's own `get_rope_index` on that row alone (so the figures are the thinker's, for
either family), keeps it, and assembles the batch's (3, B, T) position ids from the kept rows: bitwise what
`get_rope_index` returns for the whole batch (dtype and padding value included).

Only batches it can reproduce exactly are served (an attention mask, no images); for others it returns None
and the thinker computes the ids itself.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

MAX_ROWS = 200_000
"""Rows kept (least recently used dropped first); a row costs about 24 bytes per token."""


class RopePositions:
    """Memo of per-row 3-D position ids for one thinker (see the module docstring).

    Attributes:
        hits / misses: rows served from the memo / computed so far.
    """

    def __init__(self, max_rows: int = MAX_ROWS) -> None:
        self.max_rows = max_rows
        self._rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __call__(self, thinker: nn.Module, batch: dict, audio_lengths: torch.Tensor | None) -> torch.Tensor | None:
        """The batch's position ids, or None when the thinker must compute them itself.

        Args:
            thinker: the (unwrapped) thinker whose `get_rope_index` defines the ids.
            batch: a collated batch: input_ids (B, T), attention_mask (B, T), optional video_grid_thw (V, 3),
                video_second_per_grid (V,), use_audio_in_video; rows' videos and audios in row order.
            audio_lengths: (A,) long mel lengths of the batch's audios in row order (None: no audio).
        Returns:
            (3, B, T) on input_ids' device, of get_rope_index's dtype, or None (images, or no attention mask).
        """
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        if mask is None or batch.get("pixel_values") is not None or batch.get("image_grid_thw") is not None:
            return None
        cfg = thinker.config
        grids = batch.get("video_grid_thw")
        spg = batch.get("video_second_per_grid")
        in_video = bool(batch.get("use_audio_in_video", False))
        multimodal = grids is not None  # get_rope_index's branch for the whole batch
        ids_cpu, mask_cpu = input_ids.cpu(), mask.cpu().bool()
        grids_cpu = grids.cpu() if grids is not None else None
        spg_cpu = spg.cpu() if spg is not None else None
        lengths_cpu = audio_lengths.cpu() if audio_lengths is not None else None
        rows: list[torch.Tensor] = []
        fill = None
        video_idx = audio_idx = 0
        for i in range(input_ids.shape[0]):
            row = ids_cpu[i][mask_cpu[i]]
            n_video = int((row == cfg.vision_start_token_id).sum())
            n_audio = int((row == cfg.audio_start_token_id).sum())
            row_grid = grids_cpu[video_idx:video_idx + n_video] if n_video else None
            row_spg = spg_cpu[video_idx:video_idx + n_video] if n_video else None
            row_audio = lengths_cpu[audio_idx:audio_idx + n_audio] if n_audio else None
            video_idx, audio_idx = video_idx + n_video, audio_idx + n_audio
            key = (
                row.numpy().tobytes(),
                multimodal,
                in_video,
                None if row_grid is None else row_grid.numpy().tobytes(),
                None if row_spg is None else row_spg.numpy().tobytes(),
                None if row_audio is None else row_audio.numpy().tobytes(),
            )
            kept = self._rows.get(key)
            if kept is None:
                self.misses += 1
                kept = self._compute(thinker, row, multimodal, in_video, row_grid, row_spg, row_audio, grids_cpu)
                self._rows[key] = kept
                if len(self._rows) > self.max_rows:
                    self._rows.popitem(last=False)
            else:
                self.hits += 1
                self._rows.move_to_end(key)
            rows.append(kept[:, :-1])
            fill = kept[:, -1]  # the same for every row of one branch
        out = fill[:, None, None].expand(3, *input_ids.shape).clone()  # padding keeps get_rope_index's value
        for i, pos in enumerate(rows):
            out[:, i, mask_cpu[i]] = pos
        return out.to(input_ids.device)

    @staticmethod
    def _compute(
        thinker: nn.Module,
        row: torch.Tensor,
        multimodal: bool,
        in_video: bool,
        grid: torch.Tensor | None,
        spg: torch.Tensor | None,
        audio: torch.Tensor | None,
        batch_grids: torch.Tensor | None,
    ) -> torch.Tensor:
        """(3, L + 1): the position ids of one unpadded row (L), by the thinker's `get_rope_index` on that row
        alone, then the value it gives a padding position (the families differ: 1 or 0, long or float).

        A row without video in a batch with video still takes get_rope_index's multimodal branch (as in the
        batch): it gets a grid that none of its tokens reads."""
        if multimodal and grid is None:
            grid, spg = batch_grids[:1], torch.ones(1)
        padded = torch.cat([row, row[:1]])[None]  # one padding position (masked out, never read)
        mask = torch.ones_like(padded)
        mask[0, -1] = 0
        pos, _ = thinker.get_rope_index(padded, None, grid, mask, in_video, audio, spg)
        return pos[:, 0].clone()
