"""Synthetic conflict media set: real mp4 clips whose face, voice and subtitle each encode an emotion.

Every clip is one mp4 file (H.264 yuv420p video + AAC mono audio in the same file, written with PyAV)
showing a drawn face and carrying a voiced tone, plus a subtitle. Each modality expresses a *cue*
emotion over the six MER2023 labels; conflicts follow the CA-MER construction:

- ``consistent``: face and voice both show the true label at full intensity.
- ``video_aligned``: the face shows the true label at full intensity; the voice shows a *masking
  display*: another emotion (any other label, neutral included) rendered at `masking_intensity`.
- ``audio_aligned``: the reverse (genuine voice, masking face).

Intensity ``s`` in [0, 1] (genuine cues use s ~ U(0.9, 1.0), masking displays
s = masking_intensity + U(-0.05, 0.05), clipped to [0, 1]) scales how strongly a display is rendered:

- face: every geometric deviation from the neutral face (mouth curvature, mouth opening and width,
  brow height and slant, eye opening) is multiplied by ``s``, and the features' contrast against the
  skin is ``0.3 + 0.7 s`` of full contrast;
- voice: the pitch-contour excursion (semitones around the class pitch level) is multiplied by ``s``,
  the loudness is ``class_gain * (0.2 + 0.8 s)`` and the spectral tilt grows by ``0.8 (1 - s)`` (a
  weak voice is duller as well as quieter). The class pitch level and syllable rate are the class's
  identity and do not depend on ``s``.

(Version 2 widened the intensity effects: contrast was ``0.55 + 0.45 s``, loudness ``0.35 + 0.65 s``,
tilt fixed. Intensity must survive the towers' normalisation layers, which remove much of a pure level
change; a spectral-shape change and stronger contrast made the intensity word linearly decodable from
crude features at 0.86 (face) / 0.94 (voice) instead of 0.76 / 0.90, emotion still at 0.97 / 1.0.)

So a model that notices which display is genuine (the vivid one) can beat 0.5 on conflicts when
masking_intensity < 1, while one that always follows one modality cannot.

Weak displays in consistent clips (``weak_display_rate`` r, default 0): in a consistent clip, the face
and the voice each independently (probability r) show the true label at a reduced intensity instead of
the genuine U(0.9, 1.0): half of those draws "clear" U(0.6, 0.8), half "faint" U(0.3, 0.5). The cue
is unchanged (both displays still show the label), so such clips teach how each intensity looks and
sounds, never how to resolve a conflict. Stage 0 of the testbed uses it (`mllm_mer.testbed`).

Intensity words (`intensity_word`): s < 0.55 "faint", s < 0.85 "clear", else "strong". A genuine display
is "strong", a masking display at the default masking_intensity 0.4 "faint".

Noise ``v`` in [0, 1] per modality (0 = clean cue, 1 = no information about the cue):

- video: with probability ``v`` the face shows a uniformly random label instead of the cue (the
  draw may return the cue itself); in addition, for every clip, the face (features included) is
  blended toward the background by ``0.75 v`` (lower contrast), a random colour cast unrelated to
  the class is mixed into the whole frame with weight ``0.5 v``, and i.i.d. Gaussian pixel noise of
  std ``0.2 v`` (in [0, 1] units) is added per frame. At v = 1 the rendered face is independent of
  the cue.
- audio: with probability ``v`` the voice shows a uniformly random label instead of the cue; in
  addition white Gaussian noise of std ``0.003 + 0.25 v`` (full scale 1.0) is added. At v = 1 the
  rendered voice is independent of the cue.
- in both, a replaced display keeps its designed intensity (genuine or masking), so intensity still
  tells which modality is genuine; it carries no information about the emotion.
- text: the subtitle normally expresses the true label (a phrase from that label's bank, neutral =
  filler). With probability ``v`` it is replaced: half of the time by neutral filler, otherwise by a
  phrase of a uniformly random label. At v = 1 the subtitle is independent of the label.

Recorded cues: ``cues["video"]`` and ``cues["audio"]`` are the *designed* cues of the construction
(what a noise-free rendering shows; a noise draw may have replaced the displayed emotion), so
``video_aligned`` always has cues.video == label != cues.audio. ``cues["text"]`` is the emotion the
written subtitle actually expresses ("neutral" for filler). The explanation describes the designed
face and voice cues and the actual subtitle, opens with each display's intensity word, and always
ends with "Overall the emotion is <label>.", e.g.

    The face is a strong display and the voice a faint one. The face shows raised mouth corners in a
    broad smile and slightly narrowed, smiling eyes (happy). The voice is high, bright and bouncy
    (happy). The subtitle says "Okay, so that is the plan.", which carries little emotion. Both
    displays agree. Overall the emotion is happy.

The intensities come first on purpose: a word the model must read off the media is learned where the
media were just attended to (right after the prompt); stage-0 models trained with the intensity word at
the end of each cue's sentence, 20-40 tokens into the answer, never learned it (they always wrote the
most frequent word), although their prompt states encoded it. The face's intensity word is the first
one after the word "face", the voice's the first after "voice"; each cue is named as "(<emotion>)" in
the first sentence about that display that names an emotion (`mllm_mer.explanations` reads them back).

Layout written by `make_synthetic_set`: ``OUT/{train,dev,test}.jsonl`` (fields ``id, video, audio,
subtitle, label, explanation, subset, cues``; ``video`` relative to OUT, ``audio`` null = the video's
own track), ``OUT/media/<id>.mp4`` and ``OUT/manifest.json`` (config, config hash, counts, version).

Determinism: the JSONL files depend only on the config; each clip's rendering uses its own RNG
seeded from (seed, split, index), so the media are identical across runs and worker counts
(libx264 runs single-threaded at constant QP without mbtree, which was non-deterministic here; the mp4
bytes were checked identical across runs and worker counts with PyAV 18.1).
Decoded AAC audio is padded up to a multiple of 1024 samples: trim it to ``clip_seconds * sample_rate``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np

from mllm_mer import __version__
from mllm_mer.data.schema import MER2023_LABELS, SUBSETS
from mllm_mer.explanations import INTENSITY_WORDS
from mllm_mer.logs import progress

GENERATOR = "mllm_mer.data.synthetic"
"""Marker stored in manifest.json; `ensure_synthetic_set` only replaces directories carrying it."""

GENERATOR_VERSION = 2
"""Bumped whenever the rendering changes, so cached sets built by older code are rebuilt."""

SPLITS: tuple[str, ...] = ("train", "dev", "test")
_INTENSITY_EDGES = (0.55, 0.85)
"""Upper edges of "faint" and "clear"; above the last one a display is "strong"."""
GENUINE_RANGE = (0.9, 1.0)
"""Intensity of a genuine (full) display, uniform."""
WEAK_RANGES = {"clear": (0.6, 0.8), "faint": (0.3, 0.5)}
"""Intensity of a weak display of a consistent clip (`SyntheticConfig.weak_display_rate`), uniform."""
_AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic conflict set (see the module docstring for exact semantics)."""

    seed: int = 0
    """Seed of every random draw; the same config gives the same JSONL and media."""
    train_size: int = 480
    """Number of train clips."""
    dev_size: int = 96
    """Number of dev clips (balanced across the three subsets and, as far as possible, labels)."""
    test_size: int = 96
    """Number of test clips (balanced like dev)."""
    audio_noise: float = 0.05
    """Audio noise in [0, 1]: probability of a random voice emotion, plus additive noise."""
    video_noise: float = 0.05
    """Video noise in [0, 1]: probability of a random face emotion, plus contrast loss, tint, pixel noise."""
    text_noise: float = 0.7
    """Text noise in [0, 1]: probability that the subtitle is filler or a random-emotion phrase."""
    train_conflict_rate: float = 0.2
    """Fraction of train clips that are conflicts, split evenly into video_aligned / audio_aligned."""
    masking_intensity: float = 0.4
    """Intensity in [0, 1] of the masking display relative to the genuine one (1.0)."""
    weak_display_rate: float = 0.0
    """Consistent clips only: probability in [0, 1], per modality independently, that the face / the voice
    shows the label at a reduced intensity ("clear" U(0.6, 0.8) or "faint" U(0.3, 0.5), half each) instead
    of the genuine U(0.9, 1.0). 0 = every consistent display at full intensity."""
    clip_seconds: float = 2.0
    """Clip duration in seconds; clip_seconds * fps must be a whole number of frames."""
    frame_size: int = 56
    """Side of the square RGB frames in pixels (even, for yuv420p)."""
    fps: int = 4
    """Video frame rate."""
    sample_rate: int = 16000
    """Audio sample rate in Hz (mono)."""
    labels: tuple[str, ...] = MER2023_LABELS
    """Label set (a subset of the MER2023 labels, at least two; order = class ids)."""

    def __post_init__(self) -> None:
        if isinstance(self.labels, (list, tuple)):
            object.__setattr__(self, "labels", tuple(self.labels))
        errors: list[str] = []

        def check_int(name: str, lo: int, hi: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                errors.append(f"SyntheticConfig.{name}={value!r} invalid; must be an int in [{lo}, {hi}]")

        def check_float(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if ok:
                ok = (lo < value if lo_open else lo <= value) and value <= hi
            if not ok:
                bracket = "(" if lo_open else "["
                errors.append(
                    f"SyntheticConfig.{name}={value!r} invalid; must be a number in {bracket}{lo}, {hi}]"
                )

        check_int("seed", 0, 2**63 - 1)
        for name in ("train_size", "dev_size", "test_size"):
            check_int(name, 0, 1_000_000)
        for name in (
            "audio_noise", "video_noise", "text_noise", "train_conflict_rate", "masking_intensity", "weak_display_rate",
        ):
            check_float(name, 0.0, 1.0)
        check_float("clip_seconds", 0.0, 600.0, lo_open=True)
        check_int("frame_size", 28, 1024)
        if isinstance(self.frame_size, int) and self.frame_size % 2:
            errors.append(f"SyntheticConfig.frame_size={self.frame_size} invalid; must be even (yuv420p)")
        check_int("fps", 1, 120)
        if self.sample_rate not in _AAC_RATES or isinstance(self.sample_rate, bool):
            errors.append(
                f"SyntheticConfig.sample_rate={self.sample_rate!r} invalid; valid: {list(_AAC_RATES)}"
            )
        if not errors:
            frames = self.clip_seconds * self.fps
            if abs(frames - round(frames)) > 1e-6:
                errors.append(
                    f"SyntheticConfig.clip_seconds={self.clip_seconds} invalid with fps={self.fps}: "
                    f"clip_seconds * fps must be a whole number of frames"
                )
        if not isinstance(self.labels, tuple) or len(self.labels) < 2:
            errors.append(f"SyntheticConfig.labels={self.labels!r} invalid; need at least two labels")
        else:
            unknown = [label for label in self.labels if label not in MER2023_LABELS]
            if unknown:
                errors.append(f"SyntheticConfig.labels has unknown {unknown}; valid: {list(MER2023_LABELS)}")
            if len(set(self.labels)) != len(self.labels):
                errors.append(f"SyntheticConfig.labels has duplicates: {list(self.labels)}")
        if not errors and self.train_size + self.dev_size + self.test_size == 0:
            errors.append("SyntheticConfig.train_size/dev_size/test_size are all 0; nothing to generate")
        if errors:
            raise ValueError("; ".join(errors))

    @property
    def num_frames(self) -> int:
        """Frames per clip (clip_seconds * fps)."""
        return round(self.clip_seconds * self.fps)

    @property
    def num_samples(self) -> int:
        """Audio samples per clip (clip_seconds * sample_rate)."""
        return round(self.clip_seconds * self.sample_rate)

    def split_size(self, split: str) -> int:
        """Number of clips in `split` ("train", "dev" or "test")."""
        return {"train": self.train_size, "dev": self.dev_size, "test": self.test_size}[split]

    def to_dict(self) -> dict:
        """Plain JSON-able dict of the fields (labels as a list)."""
        out = asdict(self)
        out["labels"] = list(self.labels)
        return out

    def config_hash(self) -> str:
        """Stable hash of the fields and the generator version (16 hex chars)."""
        payload = json.dumps(
            {"config": self.to_dict(), "generator_version": GENERATOR_VERSION}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Per-emotion parameters.

# Face prototypes at intensity 1, as deviations from the neutral face (all zero):
# mouth_curve (+ smile, - frown), mouth_open (0 closed .. 1 round O), mouth_width (relative),
# brow_height (+ raised), brow_slant (+ inner ends raised, - inner ends lowered), eye_open (+ wide).
_FACE_KEYS = ("mouth_curve", "mouth_open", "mouth_width", "brow_height", "brow_slant", "eye_open")
_FACE: dict[str, dict[str, float]] = {
    emotion: dict(zip(_FACE_KEYS, values, strict=True))
    for emotion, values in {
        "neutral": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        "angry": (-0.5, 0.35, 0.15, -0.9, -1.0, -0.6),
        "happy": (1.0, 0.15, 0.3, 0.25, 0.0, -0.4),
        "sad": (-1.0, 0.0, 0.0, 0.1, 0.9, -0.5),
        "worried": (-0.35, 0.0, -0.3, 0.6, 1.0, 0.5),
        "surprise": (0.0, 1.0, -0.4, 1.0, 0.0, 1.0),
    }.items()
}

# Voice identity per class: pitch level (Hz, log-spaced ~5.3 semitones apart), syllables per second,
# spectral tilt (harmonic k has amplitude k**-tilt) and loudness at full intensity.
_VOICE: dict[str, dict[str, float]] = {
    "sad": dict(f0=95.0, rate=2.0, tilt=1.6, gain=0.45),
    "neutral": dict(f0=129.0, rate=3.0, tilt=1.2, gain=0.6),
    "worried": dict(f0=176.0, rate=4.5, tilt=1.2, gain=0.55),
    "angry": dict(f0=239.0, rate=5.5, tilt=0.7, gain=0.9),
    "happy": dict(f0=325.0, rate=4.0, tilt=1.0, gain=0.75),
    "surprise": dict(f0=441.0, rate=2.5, tilt=1.0, gain=0.8),
}

_FACE_WORDS = {
    "neutral": "a relaxed face with level brows, steady eyes and a straight mouth",
    "angry": "lowered brows pulled together, narrowed eyes and a tight, half-open mouth",
    "happy": "raised mouth corners in a broad smile and slightly narrowed, smiling eyes",
    "sad": "downturned mouth corners, inner brows raised and drooping eyes",
    "worried": "raised, slanted inner brows, widened eyes and a tense, narrow mouth",
    "surprise": "high raised brows, wide-open eyes and an open, round mouth",
}
_VOICE_WORDS = {
    "neutral": "level and even at a moderate pitch and pace",
    "angry": "loud, forceful and fast, with sharply falling syllables",
    "happy": "high, bright and bouncy",
    "sad": "low, soft and slow, falling in pitch",
    "worried": "tense and trembling at a mid pitch, with quick syllables",
    "surprise": "very high, with sharply rising pitch",
}
_PHRASES = {
    "neutral": (
        "I went to the office this morning.",
        "Let me check the schedule first.",
        "The meeting is on Thursday.",
        "We can take the bus from here.",
        "I put the files on the desk.",
        "It is about ten minutes away.",
        "Okay, so that is the plan.",
        "He said he would call later.",
    ),
    "angry": (
        "How dare you do this to me!",
        "I am sick of your excuses!",
        "Get out of my way right now!",
        "This is completely unacceptable!",
        "You lied to me again!",
    ),
    "happy": (
        "This is the best day ever!",
        "I'm so glad you came!",
        "We did it, I can't stop smiling!",
        "What wonderful news, I love it!",
        "Haha, that was so much fun!",
    ),
    "sad": (
        "I miss her so much.",
        "Nothing will ever be the same again.",
        "I feel so alone tonight.",
        "It hurts that he is gone.",
        "I just want to cry.",
    ),
    "worried": (
        "What if something goes wrong?",
        "I'm afraid we won't make it in time.",
        "I can't stop thinking about the results.",
        "Are you sure it is safe?",
        "I hope nothing bad happened to him.",
    ),
    "surprise": (
        "Wait, you're here? I had no idea!",
        "No way, really?",
        "I can't believe it actually happened!",
        "Wow, where did that come from?",
        "Oh! I never expected that!",
    ),
}


def explanation_corpus() -> list[str]:
    """Every phrase the synthetic explanations are built from, as sentences (a tokenizer training corpus).

    One explanation per (face cue, voice cue, intensity words) pattern plus every subtitle phrase and
    the conflict reasons; a BPE trained on it spells an explanation in about half the tokens.
    """
    lines = []
    for i, emotion in enumerate(MER2023_LABELS):
        other = MER2023_LABELS[(i + 1) % len(MER2023_LABELS)]
        word, word2 = INTENSITY_WORDS[i % 3], INTENSITY_WORDS[(i + 1) % 3]
        lines.append(
            f"The face is a {word} display and the voice a {word2} one. The face shows {_FACE_WORDS[emotion]} "
            f"({emotion}). The voice is {_VOICE_WORDS[other]} ({other}). Both displays agree. "
            f"The subtitle says it, which carries little emotion. Overall the emotion is {emotion}."
        )
        lines += [f'The subtitle says "{phrase}", which sounds {emotion}.' for phrase in _PHRASES[emotion]]
    lines += [
        "The full facial display looks genuine, while the weaker vocal one seems to mask it.",
        "The full vocal display sounds genuine, while the weaker facial one seems to mask it.",
    ]
    return lines


# --------------------------------------------------------------------------------------------------
# Rendering.


def _ellipse_cover(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a filled axis-aligned ellipse; x, y, radii in pixels."""
    rx, ry = max(rx, 0.3), max(ry, 0.3)
    d = (np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0) * min(rx, ry)  # ~signed distance
    return np.clip(0.5 - d, 0.0, 1.0)


def _segment_cover(
    x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float], half_width: float
) -> np.ndarray:
    """Anti-aliased coverage of a thick line segment with round caps (pixels)."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    d = np.hypot(x - (x0 + t * dx), y - (y0 + t * dy)) - half_width
    return np.clip(0.5 - d, 0.0, 1.0)


def _curve_cover(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, half_len: float, sag: float, half_width: float
) -> np.ndarray:
    """Coverage of a thick parabola y = cy + sag * (0.5 - (u / half_len)^2), u = x - cx, |u| <= half_len.

    `sag` > 0 puts the middle below the corners (a smile in image coordinates).
    """
    u = np.clip(x - cx, -half_len, half_len)
    yc = cy + sag * (0.5 - (u / half_len) ** 2)
    slope = -2.0 * sag * u / half_len**2
    d = np.hypot(x - cx - u, (y - yc) / np.sqrt(1.0 + slope**2)) - half_width
    return np.clip(0.5 - d, 0.0, 1.0)


def _bent_ellipse_cover(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    half_len: float,
    sag: float,
    rx: float,
    ry: float,
) -> np.ndarray:
    """Coverage of an ellipse (radii rx, ry) whose vertical centre follows the `_curve_cover` parabola."""
    rx, ry = max(rx, 0.3), max(ry, 0.3)
    u = x - cx
    yc = cy + sag * (0.5 - (np.clip(u, -half_len, half_len) / half_len) ** 2)
    d = (np.sqrt((u / rx) ** 2 + ((y - yc) / ry) ** 2) - 1.0) * min(rx, ry)
    return np.clip(0.5 - d, 0.0, 1.0)


def _paint(img: np.ndarray, cover: np.ndarray, color: np.ndarray) -> None:
    """Alpha-blend `color` (3,) into `img` (H, W, 3) float in place with `cover` (H, W) as alpha."""
    img += cover[..., None] * (color - img)


def _shift(img: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Move `img` (H, W, 3) by (dx, dy) pixels, |dx|, |dy| < 1, bilinear with edge padding; same shape."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    ix, iy = math.floor(-dx), math.floor(-dy)  # sample the source at (x - dx, y - dy)
    ax, ay = -dx - ix, -dy - iy

    def window(oy: int, ox: int) -> np.ndarray:
        return padded[1 + iy + oy : 1 + iy + oy + h, 1 + ix + ox : 1 + ix + ox + w]

    return (1 - ay) * ((1 - ax) * window(0, 0) + ax * window(0, 1)) + ay * (
        (1 - ax) * window(1, 0) + ax * window(1, 1)
    )


def render_face_frames(
    emotion: str,
    intensity: float,
    noise: float,
    rng: np.random.Generator,
    size: int = 56,
    num_frames: int = 8,
) -> np.ndarray:
    """Draw a face showing `emotion` at `intensity`, degraded by `noise` (no emotion replacement here).

    The face fills most of the frame (radius ~0.45 * size) so that each 28x28 quadrant (one merged
    Qwen2.5-Omni vision token at 56x56) holds one large feature: eyes and brows on top, mouth below.
    Per clip: random position (+-5%), size (0.92-1.05), skin, background and ink colours; per frame:
    a small head bob.

    Args:
        emotion: one of MER2023_LABELS.
        intensity: display intensity in [0, 1] (see module docstring).
        noise: degradation in [0, 1]: contrast loss 0.75 v, colour cast 0.5 v, pixel noise std 0.2 v.
        rng: generator for the jitter and the noise.
        size: frame side in pixels.
        num_frames: number of frames T.
    Returns:
        (T, size, size, 3) uint8 RGB frames.
    """
    proto = _FACE[emotion]
    p = {k: intensity * v for k, v in proto.items()}
    radius = 0.45 * size * rng.uniform(0.92, 1.05)
    cx = size / 2 + rng.uniform(-0.05, 0.05) * size
    cy = size / 2 + rng.uniform(-0.05, 0.05) * size
    background = rng.uniform(0.25, 0.75, 3) * rng.uniform(0.6, 1.0)
    skin = np.array([rng.uniform(0.75, 1.0), rng.uniform(0.55, 0.8), rng.uniform(0.4, 0.65)])
    ink_full = rng.uniform(0.0, 0.15, 3)
    ink = skin + (0.3 + 0.7 * intensity) * (ink_full - skin)  # feature contrast grows with intensity
    sclera = np.array([0.97, 0.97, 0.95])
    sclera = skin + (0.3 + 0.7 * intensity) * (sclera - skin)
    cast = rng.uniform(0.0, 1.0, 3)
    bob_phase = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres, each (H, W)
    img = np.broadcast_to(background, (size, size, 3)).copy()  # (H, W, 3) float
    face = _ellipse_cover(xx, yy, cx, cy, 0.9 * radius, radius)  # (H, W)
    _paint(img, face, skin)
    # Eyes: sclera ellipse whose height follows eye_open, with a dark pupil.
    eye_h = max(0.1 * radius * (1.0 + 0.85 * p["eye_open"]), 0.04 * radius)
    pupil = min(0.09 * radius, eye_h)
    for side in (-1.0, 1.0):
        ex, ey = cx + side * 0.38 * radius, cy - 0.2 * radius
        _paint(img, _ellipse_cover(xx, yy, ex, ey, 0.19 * radius, eye_h), sclera)
        _paint(img, _ellipse_cover(xx, yy, ex, ey, pupil, pupil), ink)
        # Brow: segment above the eye; height and slant (inner end up when slant > 0).
        by = cy - (0.5 + 0.17 * p["brow_height"]) * radius
        inner = (ex - side * 0.2 * radius, by - 0.13 * p["brow_slant"] * radius)
        outer = (ex + side * 0.2 * radius, by + 0.13 * p["brow_slant"] * radius)
        _paint(img, _segment_cover(xx, yy, inner, outer, 0.065 * radius), ink)
    # Mouth: a lip line bent by mouth_curve; an opening bent the same way (a round O when straight).
    my = cy + 0.47 * radius
    half_len = 0.36 * radius * (1.0 + 0.35 * p["mouth_width"])
    sag = 0.4 * radius * p["mouth_curve"]
    if p["mouth_open"] > 0.02:
        open_w = half_len * (1.0 - 0.25 * p["mouth_open"])
        open_h = 0.24 * radius * p["mouth_open"]
        _paint(img, _bent_ellipse_cover(xx, yy, cx, my, half_len, sag, open_w, open_h), ink)
    if p["mouth_open"] < 0.5:
        _paint(img, _curve_cover(xx, yy, cx, my, half_len, sag, 0.065 * radius), ink)
    # Degradation: fade the face toward the background, colour cast.
    img += (0.75 * noise * face)[..., None] * (background - img)
    img += 0.5 * noise * (cast - img)
    # Frames: a sub-pixel head bob (bilinear shift, < 1 px), then i.i.d. pixel noise per frame.
    frame_t = np.arange(num_frames)
    shifts = 0.6 * np.stack([np.sin(bob_phase + 1.3 * frame_t), np.cos(bob_phase + 0.9 * frame_t)], 1)
    video = np.stack([_shift(img, dx, dy) for dx, dy in shifts])  # (T, H, W, 3)
    if noise > 0:
        video += rng.normal(0.0, 0.2 * noise, video.shape)
    frames = np.clip(video * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return frames


def _contour(emotion: str, p: np.ndarray, t: np.ndarray, duration: float) -> np.ndarray:
    """Pitch contour in semitones at intensity 1, roughly zero-mean; p: phase within syllable in [0, 1]."""
    if emotion == "happy":
        return 3.5 * (np.sin(np.pi * p) - 0.64)  # arched, bouncy syllables
    if emotion == "surprise":
        return 5.0 * (p - 0.5)  # sharply rising
    if emotion == "sad":
        return -2.0 * (t / duration - 0.5) - 1.0 * (p - 0.5)  # slow fall over the clip
    if emotion == "angry":
        return 3.0 * (0.5 - p)  # emphatic falls
    if emotion == "worried":
        return 1.2 * np.sin(2 * np.pi * 7.0 * t)  # tremor
    return 0.4 * (np.sin(np.pi * p) - 0.64)  # neutral: nearly flat


def render_voice(
    emotion: str,
    intensity: float,
    noise: float,
    rng: np.random.Generator,
    sample_rate: int = 16000,
    num_samples: int = 32000,
) -> np.ndarray:
    """Synthesize a voiced tone showing `emotion` at `intensity`, degraded by `noise`.

    A glottal-like source (fundamental + harmonics up to 0.45 * sample_rate, amplitude k**-tilt)
    gated into syllables with a raised-sine envelope. Class identity: pitch level (+-0.5 semitone
    jitter), syllable rate (+-10%), spectral tilt. Intensity scales the contour excursion and the
    loudness (gain * (0.2 + 0.8 s)) and dulls the spectrum (tilt + 0.8 (1 - s)).

    Args:
        emotion: one of MER2023_LABELS.
        intensity: display intensity in [0, 1].
        noise: additive white noise std 0.003 + 0.25 * noise (no emotion replacement here).
        rng: generator for the jitter and the noise.
        sample_rate: Hz.
        num_samples: N.
    Returns:
        (N,) float32 in [-1, 1].
    """
    v = _VOICE[emotion]
    duration = num_samples / sample_rate
    t = np.arange(num_samples) / sample_rate
    period = 1.0 / (v["rate"] * rng.uniform(0.9, 1.1))
    voiced = 0.7 * period
    onset = rng.uniform(0.0, 0.3 * period)
    rel = (t - onset) % period
    in_syllable = (t >= onset) & (rel < voiced)
    p = np.clip(rel / voiced, 0.0, 1.0)
    envelope = np.where(in_syllable, np.sin(np.pi * p) ** 0.6, 0.0)
    semitones = rng.uniform(-0.5, 0.5) + intensity * _contour(emotion, p, t, duration)
    f0 = v["f0"] * 2.0 ** (semitones / 12.0)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    wave = np.zeros(num_samples)
    for k in range(1, 9):
        amp = k ** -(v["tilt"] + 0.8 * (1.0 - intensity))
        wave += np.where(k * f0 < 0.45 * sample_rate, amp, 0.0) * np.sin(
            k * phase + rng.uniform(0, 2 * np.pi)
        )
    wave /= max(np.abs(wave).max(), 1e-9)
    gain = v["gain"] * (0.2 + 0.8 * intensity)
    audio = gain * envelope * wave + rng.normal(0.0, 0.003 + 0.25 * noise, num_samples)
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def write_clip(path: str | Path, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int) -> None:
    """Encode one mp4: H.264 (libx264, yuv420p, constant QP 18) video + AAC mono audio; deterministic bytes.

    Args:
        path: output file.
        frames: (T, H, W, 3) uint8 RGB, H and W even.
        audio: (N,) float32 in [-1, 1].
        fps: frame rate.
        sample_rate: audio rate in Hz.
    """
    with av.open(str(path), "w", format="mp4") as container:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        # Constant QP, one thread and no macroblock-tree: x264's mbtree (on by default with crf) gave
        # different bytes for the same frames from run to run on these tiny clips.
        vstream.options = {"qp": "18", "preset": "veryfast", "x264-params": "mbtree=0"}
        vstream.codec_context.thread_count = 1
        astream = container.add_stream("aac", rate=sample_rate)
        astream.layout = "mono"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = i
            container.mux(vstream.encode(frame))
        container.mux(vstream.encode())
        aframe = av.AudioFrame.from_ndarray(audio[None, :].astype(np.float32), format="fltp", layout="mono")
        aframe.sample_rate = sample_rate
        aframe.pts = 0
        container.mux(astream.encode(aframe))
        container.mux(astream.encode())


# --------------------------------------------------------------------------------------------------
# Planning (all label / subset / cue / subtitle draws; the JSONL depends only on these).


@dataclass(frozen=True)
class _Clip:
    """The plan of one clip; rendering adds only jitter and noise samples."""

    id: str
    split_index: int
    index: int
    label: str
    subset: str
    video_cue: str
    audio_cue: str
    video_shown: str
    audio_shown: str
    video_intensity: float
    audio_intensity: float
    text_cue: str
    subtitle: str


def _subset_counts(cfg: SyntheticConfig, split: str) -> dict[str, int]:
    n = cfg.split_size(split)
    if split == "train":
        n_conflict = round(n * cfg.train_conflict_rate)
        n_video = n_conflict // 2
        return {"consistent": n - n_conflict, "video_aligned": n_video, "audio_aligned": n_conflict - n_video}
    base, extra = divmod(n, len(SUBSETS))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(SUBSETS)}


def _plan_split(cfg: SyntheticConfig, split: str) -> list[_Clip]:
    """Draw every clip's label, subset, cues, intensities and subtitle for one split."""
    split_index = SPLITS.index(split)
    rng = np.random.default_rng([cfg.seed, split_index, 0])
    labels = list(cfg.labels)
    order = [labels[i] for i in rng.permutation(len(labels))]
    rows: list[tuple[str, str]] = []
    k = 0  # one global label cycle keeps labels balanced both per subset and overall
    for subset, count in _subset_counts(cfg, split).items():
        for _ in range(count):
            rows.append((subset, order[k % len(order)]))
            k += 1
    rows = [rows[i] for i in rng.permutation(len(rows))]
    clips = []
    for index, (subset, label) in enumerate(rows):
        others = [x for x in labels if x != label]
        masking = others[rng.integers(len(others))]
        genuine_s = float(rng.uniform(0.9, 1.0))
        masking_s = float(np.clip(cfg.masking_intensity + rng.uniform(-0.05, 0.05), 0.0, 1.0))
        video_cue, audio_cue = label, label
        video_s, audio_s = genuine_s, float(rng.uniform(0.9, 1.0))
        if subset == "consistent" and cfg.weak_display_rate > 0:  # extra draws only when asked for
            video_s = _maybe_weak(video_s, cfg.weak_display_rate, rng)
            audio_s = _maybe_weak(audio_s, cfg.weak_display_rate, rng)
        if subset == "video_aligned":
            audio_cue, audio_s = masking, masking_s
        elif subset == "audio_aligned":
            video_cue, video_s = masking, masking_s
        video_shown = video_cue if rng.random() >= cfg.video_noise else labels[rng.integers(len(labels))]
        audio_shown = audio_cue if rng.random() >= cfg.audio_noise else labels[rng.integers(len(labels))]
        text_cue = label
        if rng.random() < cfg.text_noise:
            text_cue = "neutral" if rng.random() < 0.5 else labels[rng.integers(len(labels))]
        bank = _PHRASES[text_cue]
        subtitle = bank[rng.integers(len(bank))]
        clips.append(
            _Clip(
                id=f"{split}_{index:05d}",
                split_index=split_index,
                index=index,
                label=label,
                subset=subset,
                video_cue=video_cue,
                audio_cue=audio_cue,
                video_shown=video_shown,
                audio_shown=audio_shown,
                video_intensity=round(video_s, 4),
                audio_intensity=round(audio_s, 4),
                text_cue=text_cue,
                subtitle=subtitle,
            )
        )
    return clips


def _maybe_weak(intensity: float, rate: float, rng: np.random.Generator) -> float:
    """With probability `rate` a weak intensity ("clear" or "faint", half each), else `intensity`."""
    if rng.random() >= rate:
        return intensity
    lo, hi = WEAK_RANGES["clear" if rng.random() < 0.5 else "faint"]
    return float(rng.uniform(lo, hi))


def intensity_word(intensity: float) -> str:
    """The word for a display intensity in [0, 1]: < 0.55 "faint", < 0.85 "clear", else "strong"."""
    for word, edge in zip(INTENSITY_WORDS, _INTENSITY_EDGES, strict=False):
        if intensity < edge:
            return word
    return INTENSITY_WORDS[-1]


def _explain(clip: _Clip) -> str:
    """EMER-style explanation: both displays' intensity, the designed face / voice cues, the subtitle, the label."""
    intensity = (
        f"The face is a {intensity_word(clip.video_intensity)} display "
        f"and the voice a {intensity_word(clip.audio_intensity)} one."
    )
    face = f"The face shows {_FACE_WORDS[clip.video_cue]} ({clip.video_cue})."
    voice = f"The voice is {_VOICE_WORDS[clip.audio_cue]} ({clip.audio_cue})."
    if clip.text_cue == "neutral":
        text = f'The subtitle says "{clip.subtitle}", which carries little emotion.'
    else:
        text = f'The subtitle says "{clip.subtitle}", which sounds {clip.text_cue}.'
    if clip.subset == "consistent":
        reason = "Both displays agree."
    elif clip.subset == "video_aligned":
        reason = "The full facial display looks genuine, while the weaker vocal one seems to mask it."
    else:
        reason = "The full vocal display sounds genuine, while the weaker facial one seems to mask it."
    return f"{intensity} {face} {voice} {text} {reason} Overall the emotion is {clip.label}."


def _record(clip: _Clip) -> dict:
    """The JSONL row of one clip (fields exactly id, video, audio, subtitle, label, explanation, subset, cues)."""
    return {
        "id": clip.id,
        "video": f"media/{clip.id}.mp4",
        "audio": None,
        "subtitle": clip.subtitle,
        "label": clip.label,
        "explanation": _explain(clip),
        "subset": clip.subset,
        "cues": {"video": clip.video_cue, "audio": clip.audio_cue, "text": clip.text_cue},
    }


def _render_clip(job: tuple[SyntheticConfig, _Clip, str]) -> None:
    """Render and encode one clip (worker entry point; picklable)."""
    cfg, clip, path = job
    rng = np.random.default_rng([cfg.seed, clip.split_index, 1, clip.index])
    frames = render_face_frames(
        clip.video_shown, clip.video_intensity, cfg.video_noise, rng, cfg.frame_size, cfg.num_frames
    )
    audio = render_voice(
        clip.audio_shown, clip.audio_intensity, cfg.audio_noise, rng, cfg.sample_rate, cfg.num_samples
    )
    write_clip(path, frames, audio, cfg.fps, cfg.sample_rate)


# --------------------------------------------------------------------------------------------------
# Building on disk.


def _read_manifest(out_dir: Path) -> dict | None:
    """The synthetic manifest of `out_dir`, or None when there is none or it is not ours."""
    try:
        manifest = json.loads((out_dir / "manifest.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _check_replaceable(out_dir: Path) -> None:
    """Raise unless `out_dir` is absent, an empty directory, or a synthetic set built by this module."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(
            f"{out_dir} exists and is not a directory; choose another synthetic output path"
        )
    if any(out_dir.iterdir()) and _read_manifest(out_dir) is None:
        raise FileExistsError(
            f"{out_dir} exists, is not empty and has no synthetic manifest.json (generator={GENERATOR!r}); "
            f"refusing to replace it: choose another output path or remove it yourself"
        )


def make_synthetic_set(out_dir: str | Path, cfg: SyntheticConfig, workers: int = 1) -> Path:
    """Build the set in a temporary directory beside `out_dir`, then rename it into place.

    An existing `out_dir` is replaced only if it is empty or a synthetic set built by this module.

    Args:
        out_dir: target directory.
        cfg: the set's parameters.
        workers: processes that render and encode clips (spawned; the output does not depend on it).
    Returns:
        `out_dir` as a Path.
    Raises:
        FileExistsError: `out_dir` holds something else.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared directory
    try:
        (tmp / "media").mkdir()
        counts: dict[str, dict] = {}
        jobs: list[tuple[SyntheticConfig, _Clip, str]] = []
        for split in SPLITS:
            clips = _plan_split(cfg, split)
            with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for clip in clips:
                    f.write(json.dumps(_record(clip), ensure_ascii=False) + "\n")
            jobs += [(cfg, clip, str(tmp / "media" / f"{clip.id}.mp4")) for clip in clips]
            counts[split] = {
                "total": len(clips),
                "subset": {s: sum(c.subset == s for c in clips) for s in SUBSETS},
                "label": {lab: sum(c.label == lab for c in clips) for lab in cfg.labels},
                "subset_label": {s: dict(Counter(c.label for c in clips if c.subset == s)) for s in SUBSETS},
            }
        bar = progress(total=len(jobs), desc=f"build synthetic set {out_dir}", unit="clip")
        if workers > 1 and len(jobs) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_render_clip, jobs, chunksize=8):
                    bar.update(1)
        else:
            for job in jobs:
                _render_clip(job)
                bar.update(1)
        bar.close()
        manifest = {
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "version": __version__,
            "config": cfg.to_dict(),
            "config_hash": cfg.config_hash(),
            "counts": counts,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            _swap_into_place(tmp, out_dir)
        except OSError:
            # Another process may have built the same set meanwhile (e.g. several ranks): keep theirs.
            done = _read_manifest(out_dir)
            if done is None or done.get("config_hash") != cfg.config_hash():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, moving a replaceable old `out_dir` aside first."""
    _check_replaceable(out_dir)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "set")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_synthetic_set(out_dir: str | Path, cfg: SyntheticConfig, workers: int = 1) -> Path:
    """Reuse `out_dir` if its manifest's config hash matches `cfg`, else (re)build it.

    Args:
        out_dir: target directory.
        cfg: the set's parameters.
        workers: processes used when building.
    Returns:
        `out_dir` as a Path.
    Raises:
        FileExistsError: `out_dir` exists, is not empty and is not a synthetic set (never deleted).
    """
    out_dir = Path(out_dir)
    manifest = _read_manifest(out_dir)
    if manifest is not None and manifest.get("config_hash") == cfg.config_hash():
        return out_dir
    return make_synthetic_set(out_dir, cfg, workers=workers)
