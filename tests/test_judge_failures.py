"""Judge failures never lose work and never leak the key: local http.server endpoints on 127.0.0.1 only
(a 302 redirect, a 500, a down port, a reply of the wrong types), and an evaluation with a failing judge."""

import http.server
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

from analysis.core.config import ConfigError, InputError
from analysis.safety import evaluate as ev
from analysis.safety import judge as jg

KEY = "secret-key-123"
GOOD = {"choices": [{"message": {"content": "#thereason: x\n#thescore: 4"}}]}


class Endpoint:
    """A local HTTP server answering every POST with ``answer(handler) -> (status, headers, body)``; records
    the requests (path, Authorization header)."""

    def __init__(self, answer):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
                status, headers, body = answer(self)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoints():
    made = []

    def make(answer):
        endpoint = Endpoint(answer)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


def judge(url, **changes):
    return jg.JudgeConfig(base_url=url, model="m", api_key_env="I20_JUDGE_KEY", **{"retries": 1, **changes})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_good_endpoint_scores_and_gets_the_key(endpoints, monkeypatch):
    monkeypatch.setenv("I20_JUDGE_KEY", KEY)
    good = endpoints(lambda h: (200, {"Content-Type": "application/json"}, json.dumps(GOOD).encode()))
    assert jg.judge_results([("p", "r")], judge(good.url)) == [(4, None)]
    assert good.requests == [{"path": "/v1/chat/completions", "auth": f"Bearer {KEY}"}]
    jg.check_judge_reachable(judge(good.url))


def test_a_redirect_is_not_followed_and_the_key_is_not_sent_on(endpoints, monkeypatch):
    monkeypatch.setenv("I20_JUDGE_KEY", KEY)
    elsewhere = endpoints(lambda h: (200, {}, json.dumps(GOOD).encode()))
    redirecting = endpoints(lambda h: (302, {"Location": elsewhere.url + "/chat/completions"}, b""))
    with pytest.raises(jg.JudgeError, match="redirect \\(302\\) to http://127.0.0.1"):
        jg.call_judge([{"role": "user", "content": "x"}], judge(redirecting.url))
    assert elsewhere.requests == []  # the key never reached the redirect's host
    results = jg.judge_results([("p", "r"), ("p2", "r2")], judge(redirecting.url))
    assert [score for score, _ in results] == [None, None] and "redirect" in results[0][1]
    assert elsewhere.requests == []


def test_a_500_scores_none_with_the_reason_after_the_retries(endpoints):
    failing = endpoints(lambda h: (500, {}, b"boom"))
    results = jg.judge_results([("p", "r")] * 5, judge(failing.url, retries=2, max_consecutive_failures=2),
                               backoff=0.01)
    assert all(score is None for score, _ in results)
    assert "could not be reached: HTTP Error 500" in results[0][1]
    assert results[2][1].startswith("not sent: the 2 calls before failed")
    assert len(failing.requests) == 4  # 2 calls x 2 tries, then no more calls


@pytest.mark.parametrize("body, reason", [
    (b"[1, 2]", "JSON list, not an object"),
    (json.dumps({"choices": []}).encode(), "no list of choices"),
    (json.dumps({"choices": [{"message": "hi"}]}).encode(), "no message object"),
    (json.dumps({"choices": [{"message": {"content": 5}}]}).encode(), "content is a int"),
    (b"<html>", "not JSON"),
])
def test_replies_of_the_wrong_types_are_errors_with_the_reason(endpoints, body, reason):
    odd = endpoints(lambda h: (200, {}, body))
    [(score, error)] = jg.judge_results([("p", "r")], judge(odd.url))
    assert score is None and reason in error


def test_a_down_endpoint_is_found_fast_and_is_an_input_error():
    down = judge(f"http://127.0.0.1:{free_port()}/v1")
    start = time.perf_counter()
    with pytest.raises(jg.JudgeError, match="cannot be reached") as caught:
        jg.check_judge_reachable(down)
    assert time.perf_counter() - start < 5 and isinstance(caught.value, InputError)


@pytest.mark.parametrize("url", ["http:///v1", "http://", "https://:8000/v1", "http://[::1/v1"])
def test_urls_without_a_host_are_refused(url):
    with pytest.raises(ConfigError):
        jg.JudgeConfig(base_url=url, model="m")


SMALL = dict(model="tiny-llama", max_new_tokens=3, n_harmful=4, n_benign=2, n_utility=2, batch_size=4,
             utility_accuracy=False)


def test_an_evaluation_with_a_failing_judge_keeps_its_generations_and_counts_the_failures(tiny_llama, tmp_path,
                                                                                        endpoints, monkeypatch):
    monkeypatch.setenv("I20_JUDGE_KEY", KEY)
    elsewhere = endpoints(lambda h: (200, {}, json.dumps(GOOD).encode()))
    redirecting = endpoints(lambda h: (302, {"Location": elsewhere.url}, b""))
    store = ev.evals_store(tmp_path)
    config = ev.EvalConfig(judge=judge(redirecting.url), **SMALL)
    result = ev.evaluate(config, model=tiny_llama, store=store)
    harmful = [r for r in result.records if r["set"] == "harmful"]
    assert len(harmful) == 4 and all(r["judge_score"] is None and "redirect" in r["judge_error"] for r in harmful)
    assert result.metrics["judge_n_failed"] == 4 and result.metrics["judge_n_called"] == 4
    assert elsewhere.requests == [] and store.status(result.run_id) == "complete"
    assert "judge calls failed" in ev.format_report([result], examples=0)
    assert not (tmp_path / "_partial" / f"{result.run_id}.json").exists()


def test_a_judge_crash_leaves_the_generations_and_the_next_run_resumes_at_the_judge(tiny_llama, tmp_path,
                                                                                     endpoints, monkeypatch):
    good = endpoints(lambda h: (200, {}, json.dumps(GOOD).encode()))
    store = ev.evals_store(tmp_path)
    config = ev.EvalConfig(judge=judge(good.url), **SMALL)

    def crash(*args, **kwargs):
        raise RuntimeError("the process died while judging")

    monkeypatch.setattr(ev, "judge_results", crash)
    with pytest.raises(RuntimeError):
        ev.evaluate(config, model=tiny_llama, store=store)
    partial = json.loads((tmp_path / "_partial" / f"{config.run_id()}.json").read_text())
    assert len([r for r in partial["records"] if r["set"] == "harmful"]) == 4 and "refusal" in partial["nll"]
    monkeypatch.undo()

    def no_model(*args, **kwargs):
        raise AssertionError("the generations were stored: nothing to generate again")

    monkeypatch.setattr("analysis.llm.models.load_model", no_model)
    result = ev.evaluate(config, store=store)
    assert [r["judge_score"] for r in result.records if r["set"] == "harmful"] == [4] * 4
    assert [r["completion"] for r in result.records] == [r["completion"] for r in partial["records"]]
    assert len(good.requests) == 4 and not (tmp_path / "_partial" / f"{config.run_id()}.json").exists()


def test_the_cli_fails_fast_with_exit_2_and_no_traceback_when_the_judge_is_down(tmp_path):
    command = [sys.executable, "-m", "analysis", "evaluate", "--model", "tiny-llama", "--n-harmful", "2",
               "--max-new-tokens", "2", "--judge-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "m"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "SSE_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot be reached" in done.stdout and "Traceback" not in done.stdout + done.stderr
    assert time.perf_counter() - start < 60
    assert not list((tmp_path / "evals").glob("*/manifest.json")) if (tmp_path / "evals").exists() else True


def test_a_stored_evaluation_with_judge_failures_is_completed_by_asking_the_judge_again(tiny_llama, tmp_path,
                                                                                      endpoints, monkeypatch):
    state = {"up": False}
    flaky = endpoints(lambda h: (200, {}, json.dumps(GOOD).encode()) if state["up"] else (500, {}, b"down"))
    store = ev.evals_store(tmp_path)
    config = ev.EvalConfig(judge=judge(flaky.url), **SMALL)
    first = ev.evaluate(config, model=tiny_llama, store=store)
    assert first.metrics["judge_n_failed"] == 4
    state["up"] = True

    def no_model(*args, **kwargs):
        raise AssertionError("only the judge runs again")

    monkeypatch.setattr("analysis.llm.models.load_model", no_model)
    second = ev.evaluate(config, store=store)
    assert second.metrics["judge_n_failed"] == 0 and second.metrics["judge_mean_score"] == 4
    assert [r["completion"] for r in second.records] == [r["completion"] for r in first.records]
    third = ev.evaluate(config, store=store)
    assert third.cached and third.metrics["judge_n_failed"] == 0
    assert not (tmp_path / "_partial").exists() or not list((tmp_path / "_partial").iterdir())
