"""Decode a sample's media once with PyAV: video frames at a fixed rate and the audio track.

One container open per file: when a sample's audio is the video's own track, frames and audio come from
the same open. Audio is resampled to mono float32 at the processor's rate. Problems raise `MediaError`
naming the sample id, the file and what is wrong; nothing is padded, cut or zero-filled silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SILENCE_PEAK = 1e-4
"""An audio track whose peak amplitude stays below this (full scale 1.0) counts as silent."""


class MediaError(ValueError):
    """A sample's media cannot be used; the message names the sample id, the file and the problem."""


@dataclass
class DecodedMedia:
    """Decoded media of one sample.

    Attributes:
        frames: (F, H, W, 3) uint8 RGB frames sampled at `fps`, or None when the sample has no video.
        audio: (N,) float32 mono waveform at `sample_rate`, or None when the sample has no audio.
    """

    frames: np.ndarray | None
    audio: np.ndarray | None
    fps: float
    sample_rate: int


def _read_container(
    path: Path, *, want_video: bool, want_audio: bool, fps: float, max_frames: int, sample_rate: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One pass over one file: demux the first video and/or audio stream together."""
    with av.open(str(path)) as container:
        streams = []
        if want_video:
            if not container.streams.video:
                raise MediaError("has no video stream")
            streams.append(container.streams.video[0])
            streams[-1].thread_type = "AUTO"
        if want_audio:
            if not container.streams.audio:
                raise MediaError("has no audio track")
            streams.append(container.streams.audio[0])
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate) if want_audio else None
        frames: list[av.VideoFrame] = []  # converted to RGB only once chosen (most are not)
        times: list[float] = []
        chunks: list[np.ndarray] = []
        for packet in container.demux(*streams):
            for frame in packet.decode():
                if isinstance(frame, av.VideoFrame):
                    if frame.time is not None:
                        frames.append(frame)
                        times.append(float(frame.time))
                else:
                    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
        if resampler is not None:
            chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
        rate = float(container.streams.video[0].average_rate or fps) if want_video else fps
    video = audio = None
    if want_video:
        if not frames:
            raise MediaError("video stream has no decodable frames")
        t = np.asarray(times)
        order = np.argsort(t, kind="stable")  # decode order may differ from presentation order
        t = t[order]
        duration = t[-1] - t[0] + 1.0 / rate
        n = max(2, min(max_frames, int(round(duration * fps))))
        n -= n % 2  # the vision tower groups frames in pairs (temporal patch 2)
        targets = t[0] + np.arange(n) / fps
        idx = np.clip(np.searchsorted(t, targets + 1e-6, side="right") - 1, 0, len(t) - 1)
        rgb = {int(j): frames[order[j]].to_ndarray(format="rgb24") for j in np.unique(idx)}
        video = np.stack([rgb[int(j)] for j in idx])
    if want_audio:
        if not chunks:
            raise MediaError("audio stream has no decodable samples")
        audio = np.concatenate(chunks).astype(np.float32, copy=False)
    return video, audio


def decode_sample_media(
    sample_id: str,
    video: Path | None,
    audio: Path | None,
    *,
    fps: float,
    max_frames: int,
    sample_rate: int,
    max_audio_seconds: float,
    need_audio: bool = True,
    allow_silent_audio: bool = False,
) -> DecodedMedia:
    """Decode a sample's frames and audio (from `audio`, else from the video's own track).

    Raises:
        MediaError: missing or unreadable file, no video/audio stream where one is needed, or audio longer
            than `max_audio_seconds` (the processor would otherwise truncate it silently).
    """
    frames = wav = None

    def read(path: Path, want_video: bool, want_audio: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not Path(path).is_file():
            raise MediaError(f"sample '{sample_id}': {path}: file not found")
        if Path(path).stat().st_size == 0:
            raise MediaError(f"sample '{sample_id}': {path}: file is empty (0 bytes)")
        try:
            return _read_container(
                Path(path), want_video=want_video, want_audio=want_audio, fps=fps,
                max_frames=max_frames, sample_rate=sample_rate,
            )
        except MediaError as exc:
            hint = "; give the sample a separate 'audio' file or drop it" if "audio track" in str(exc) else ""
            raise MediaError(f"sample '{sample_id}': {path}: {exc}{hint}") from None
        except (av.FFmpegError, ValueError, IndexError, OSError) as exc:
            raise MediaError(
                f"sample '{sample_id}': {path}: cannot be decoded ({type(exc).__name__}: {exc})"
            ) from None

    if video is not None:
        frames, wav = read(video, True, need_audio and audio is None)
    if need_audio and audio is not None:
        _, wav = read(audio, False, True)
    if wav is not None and len(wav) / sample_rate > max_audio_seconds + 1e-6:
        raise MediaError(
            f"sample '{sample_id}': {audio or video}: audio is {len(wav) / sample_rate:.2f} s, longer than the "
            f"{max_audio_seconds:g} s window the processor takes; cut the clip into segments (or raise "
            "data.max_audio_seconds for a processor with a longer window). It is never truncated silently."
        )
    if wav is not None and not allow_silent_audio and float(np.abs(wav).max(initial=0.0)) < SILENCE_PEAK:
        raise MediaError(
            f"sample '{sample_id}': {audio or video}: audio track is silent (peak amplitude < {SILENCE_PEAK:g}); "
            "a broken extraction is likely. Fix the file, or set data.allow_silent_audio=true."
        )
    if frames is None and wav is None:
        raise MediaError(f"sample '{sample_id}': has neither video nor audio")
    return DecodedMedia(frames=frames, audio=wav, fps=fps, sample_rate=sample_rate)
