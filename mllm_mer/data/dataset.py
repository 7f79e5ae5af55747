"""Decoded-media datasets: every sample's media is decoded once and kept in a `datasets` Arrow cache.

`build_media_dataset` decodes each sample (frames + audio of the same file in one pass) into an Arrow
table under `cache_dir`; `datasets` fingerprints the inputs (sample ids, media paths with their `file_state`,
decoding options), so a changed file or option re-decodes and an unchanged set loads instantly.
`MerDataset` pairs each `Sample` with its decoded arrays for the collator. With `data.decode_cache=false`,
`DecodingDataset` decodes each item when it is read instead (after one checking pass), so nothing but the
samples is kept; `load_media` picks one of the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from mllm_mer.config import RunConfig
from mllm_mer.data.media import DecodedMedia, MediaError, decode_sample_media
from mllm_mer.data.schema import Sample
from mllm_mer.logs import datasets_bars_off, progress

if TYPE_CHECKING:  # `datasets` is imported where the decode cache is used (seconds of start-up otherwise)
    import datasets


def _features() -> datasets.Features:
    """The decode cache's Arrow schema."""
    import datasets

    return datasets.Features(
        {
            "id": datasets.Value("string"),
            "frames": datasets.Value("binary"),
            "frames_shape": datasets.Sequence(datasets.Value("int32")),
            "audio": datasets.Value("binary"),
            "error": datasets.Value("string"),
        }
    )


@dataclass(frozen=True)
class DecodeOptions:
    """How media are decoded (part of the cache fingerprint)."""

    fps: float
    max_frames: int
    sample_rate: int
    max_audio_seconds: float
    need_audio: bool = True
    allow_silent_audio: bool = False


def file_state(path: str | Path) -> list[int]:
    """What identifies a file's current contents without reading it: device, inode, size, mtime, ctime (ns).

    The ctime is there because no user tool can set it back (`touch -d` and `os.utime` change the mtime but
    bump the ctime), so a rewrite that keeps the size and restores the mtime still changes the state.
    """
    st = Path(path).stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _file_key(path: Path | None) -> list:
    if path is None:
        return []
    try:
        return [str(path), *file_state(path)]
    except OSError as exc:  # gone or unreadable: decoding reports it (MediaError, or skipped)
        return [str(path), f"unreadable: {type(exc).__name__}"]


def _generate(rows: tuple[dict, ...], options: dict, skip_bad: bool) -> Iterator[dict]:
    problems: list[str] = []
    for row in progress(rows, desc="decode media", unit="clip"):  # runs only when the cache misses
        try:
            media = decode_sample_media(
                row["id"],
                Path(row["video"]) if row["video"] else None,
                Path(row["audio"]) if row["audio"] else None,
                **options,  # DecodeOptions' fields are decode_sample_media's keyword arguments
            )
        except MediaError as exc:
            problems.append(str(exc))
            if skip_bad:  # kept as an error row: the cache remembers which samples are bad
                yield {"id": row["id"], "frames": b"", "frames_shape": [], "audio": b"", "error": str(exc)}
            continue
        frames = media.frames
        yield {
            "id": row["id"],
            "frames": b"" if frames is None else np.ascontiguousarray(frames).tobytes(),
            "frames_shape": [] if frames is None else list(frames.shape),
            "audio": b"" if media.audio is None else media.audio.tobytes(),
            "error": "",
        }
    if problems and not skip_bad:  # nothing is cached: the generation fails as a whole
        raise unusable_media(problems)


def unusable_media(problems: Sequence[str]) -> MediaError:
    """One `MediaError` listing every bad sample's problem line."""
    return MediaError(
        f"{len(problems)} sample(s) with unusable media:\n" + "\n".join(f"  - {p}" for p in problems)
    )


def decode(sample: Sample, options: DecodeOptions) -> DecodedMedia:
    """Decode one sample's media with `options` (raises `MediaError` naming the sample and file)."""
    return decode_sample_media(sample.id, sample.video, sample.audio, **dataclasses.asdict(options))


def check_share(
    samples: Sequence[Sample], options: DecodeOptions, rank: int = 0, world: int = 1, desc: str = "check media"
) -> list[tuple[str, str]]:
    """Decode this rank's share of `samples` (every `world`-th, from `rank`) once: (sample id, problem line)
    for each sample whose media cannot be used. Ranks gather their shares and pass them to `streamed_media`.
    The main process shows a progress bar labelled `desc`."""
    bad = []
    for s in progress(samples[rank::world], desc=desc, unit="clip"):
        try:
            decode(s, options)
        except MediaError as exc:
            bad.append((s.id, str(exc)))
    return bad


def check_media(samples: Sequence[Sample], options: DecodeOptions, desc: str = "check media") -> list[str]:
    """Decode every sample once and return one problem line per bad sample (empty list = all good)."""
    return [problem for _, problem in check_share(samples, options, desc=desc)]


def streamed_media(
    samples: Sequence[Sample], options: DecodeOptions, bad: Sequence[tuple[str, str]], skip_bad: bool = False
) -> tuple[list[Sample], DecodingDataset, list[str]]:
    """`load_media` without a decode cache, given the checking pass's findings (`check_share`, all ranks').

    Returns:
        (the good samples in order, a `DecodingDataset` over them, the bad ones' problems in sample order).
    Raises:
        MediaError: (skip_bad=False) when any sample is bad, listing them all.
    """
    found = dict(bad)
    problems = [found[s.id] for s in samples if s.id in found]
    if problems and not skip_bad:
        raise unusable_media(problems)
    good = [s for s in samples if s.id not in found]
    return good, DecodingDataset(good, options), problems


def build_media_dataset(
    samples: Sequence[Sample], options: DecodeOptions, cache_dir: str | Path, skip_bad: bool = False
) -> datasets.Dataset:
    """Decode all samples (or load them from the cache) into an Arrow dataset, in sample order.

    Args:
        samples: the samples to decode.
        options: decoding options (part of the cache key).
        cache_dir: `datasets` cache folder.
        skip_bad: keep going past bad media; their rows carry the problem in `error` (see `split_errors`).
    Raises:
        MediaError: (skip_bad=False) listing every sample whose media cannot be used (nothing is cached).
    """
    import datasets

    rows = [
        {
            "id": s.id,
            "video": str(s.video) if s.video else "",
            "audio": str(s.audio) if s.audio else "",
            "key": _file_key(s.video) + _file_key(s.audio),
        }
        for s in samples
    ]
    try:
        with datasets_bars_off():  # our "decode media" bar reports the phase
            ds = datasets.Dataset.from_generator(
                _generate,
                gen_kwargs={
                    "rows": tuple(rows),
                    "options": options.__dict__,
                    "skip_bad": skip_bad,
                },  # no list: sharded
                features=_features(),
                cache_dir=str(cache_dir),
            )
    except datasets.exceptions.DatasetGenerationError as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, MediaError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, MediaError):
            raise cause from None
        raise
    return ds


def split_errors(
    samples: Sequence[Sample], media: datasets.Dataset
) -> tuple[list[Sample], datasets.Dataset, list[str]]:
    """Drop the error rows of a `skip_bad` media dataset: (good samples, their media rows, problems)."""
    errors = media["error"]
    keep = [i for i, e in enumerate(errors) if not e]
    if len(keep) == len(errors):
        return list(samples), media, []
    return [samples[i] for i in keep], media.select(keep), [e for e in errors if e]


def load_media(
    samples: Sequence[Sample], options: DecodeOptions, cache_dir: str | Path | None, skip_bad: bool = False
) -> tuple[list[Sample], torch.utils.data.Dataset, list[str]]:
    """The samples served, a dataset of `(Sample, DecodedMedia)` items over them, and the skipped ones' problems.

    Args:
        samples: the split's samples.
        options: decoding options.
        cache_dir: the `datasets` decode cache (`build_media_dataset`, `MerDataset`); None: one checking pass
            now, then every item is decoded when it is read (`DecodingDataset`, `data.decode_cache=false`).
        skip_bad: drop samples whose media cannot be used (their problems are returned) instead of raising.
    Raises:
        MediaError: (skip_bad=False) listing every sample whose media cannot be used.
    """
    if cache_dir is not None:
        media = build_media_dataset(samples, options, cache_dir, skip_bad=skip_bad)
        good, media, problems = split_errors(samples, media)
        return good, MerDataset(good, media, options), problems
    return streamed_media(samples, options, check_share(samples, options), skip_bad)


class DecodingDataset(torch.utils.data.Dataset):
    """Samples decoded when read (no decode cache); items are `(Sample, DecodedMedia)` like `MerDataset`."""

    def __init__(self, samples: Sequence[Sample], options: DecodeOptions) -> None:
        self.samples = list(samples)
        self.options = options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Sample, DecodedMedia]:
        sample = self.samples[int(idx)]
        return sample, decode(sample, self.options)


class MerDataset(torch.utils.data.Dataset):
    """Samples paired with their decoded media; items are `(Sample, DecodedMedia)`."""

    def __init__(self, samples: Sequence[Sample], media: datasets.Dataset, options: DecodeOptions) -> None:
        if len(samples) != len(media):
            raise ValueError(f"{len(samples)} samples but {len(media)} decoded rows")
        self.samples = list(samples)
        self.media = media
        self.options = options

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[Sample, DecodedMedia]:
        row = self.media[int(idx)]
        sample = self.samples[int(idx)]
        if row["id"] != sample.id:
            raise RuntimeError(
                f"decoded cache out of order: row {idx} is '{row['id']}', expected '{sample.id}'"
            )
        # one copy into a writable buffer: the processor hands the arrays to torch.from_numpy, which warns
        # (UserWarning, once per process) on the read-only views np.frombuffer gives of the Arrow bytes
        frames = None
        if row["frames_shape"]:
            frames = np.frombuffer(bytearray(row["frames"]), dtype=np.uint8).reshape(row["frames_shape"])
        audio = np.frombuffer(bytearray(row["audio"]), dtype=np.float32) if row["audio"] else None
        return sample, DecodedMedia(
            frames=frames, audio=audio, fps=self.options.fps, sample_rate=self.options.sample_rate
        )


def decode_options(cfg: RunConfig, processor) -> DecodeOptions:
    """The run's decoding settings (`data.*`) with the processor's audio sample rate and window."""
    fe = processor.feature_extractor
    window = float(fe.chunk_length)
    return DecodeOptions(
        fps=cfg.data.fps,
        max_frames=cfg.data.max_frames,
        sample_rate=int(fe.sampling_rate),
        max_audio_seconds=min(window, cfg.data.max_audio_seconds or window),
        allow_silent_audio=cfg.data.allow_silent_audio,
    )


def decode_cache_dir(cfg: RunConfig) -> str | None:
    """The `datasets` decode cache of the run (`data.cache_dir`), or None with `data.decode_cache=false`."""
    return cfg.data.cache_dir if cfg.data.decode_cache else None


def load_media_on_ranks(
    samples: list[Sample],
    options: DecodeOptions,
    cache_dir: str | None,
    skip_bad: bool,
    accelerator: Accelerator | None,
) -> tuple[list[Sample], torch.utils.data.Dataset, list[str]]:
    """`load_media` for every rank: with a decode cache the main process decodes first and the others read
    the cache; without one (`cache_dir` None) the ranks split the checking pass and share what they found.
    `accelerator` None: one process."""
    if accelerator is None:
        return load_media(samples, options, cache_dir, skip_bad=skip_bad)
    if cache_dir is not None:
        with accelerator.main_process_first():
            return load_media(samples, options, cache_dir, skip_bad=skip_bad)
    bad = check_share(samples, options, accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1:
        bad = gather_object(bad)
    return streamed_media(samples, options, bad, skip_bad=skip_bad)
