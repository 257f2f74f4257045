"""vLLM with the sprinter proposer equals vLLM without speculation at temperature 0: offline (token for token) and
served (`vllm serve` on 127.0.0.1, OpenAI-compatible requests over HTTP, concurrent and streamed).

Needs vLLM (scripts/install_vllm.sh): skipped where it is not installed; .ci/run's second step installs it in its own
virtual environment and runs this file there. Each engine start costs ~30 s on 2 CPU cores, so the file starts three.
"""

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from sprinter.integrations.vllm import CLASS_PATH, CONFIG_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
K = 4
MAX_TOKENS = 32
PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n", "class Stack:\n    def push(self, x):", "# a comment",
           "return sorted(", "for i in range(10):\n"]
# One engine on a shared 2-core machine: float32, eager, a small KV cache, one thread (docs/vllm.md).
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SERVE_START_SECONDS = 300
STOP_SECONDS = 30


def speculative_config() -> dict:
    return {"method": "custom_class", "model": CLASS_PATH, "num_speculative_tokens": K}


@pytest.fixture(scope="module")
def proposer_env(vllm_pair, tmp_path_factory):
    """The proposer's YAML (with a trace of its chain lengths) and the environment an engine runs in."""
    folder = tmp_path_factory.mktemp("vllm-proposer")
    trace = folder / "trace.jsonl"
    (folder / "proposer.yaml").write_text(f"draft: {vllm_pair / 'draft'}\nverifier: {vllm_pair / 'verifier'}\n"
                                          f"trace: {trace}\n")
    return {**ENV, CONFIG_ENV: str(folder / "proposer.yaml")}, trace


def offline(target, speculative, env):
    """Token ids and texts of PROMPTS from one vLLM engine in this process, greedy."""
    from vllm import LLM, SamplingParams

    for key, value in {**env, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ[key] = value
    llm = LLM(model=str(target), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              speculative_config=speculative)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    result = [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]
    del llm
    gc.collect()
    return result


@pytest.fixture(scope="module")
def plain(vllm_pair, proposer_env):
    return offline(vllm_pair / "target", None, proposer_env[0])


def test_the_sprinter_proposer_equals_plain_vllm_token_for_token(vllm_pair, proposer_env, plain):
    env, trace = proposer_env
    trace.unlink(missing_ok=True)
    assert offline(vllm_pair / "target", speculative_config(), env) == plain
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    lengths = [n for step in steps for n in step]
    assert set(lengths) - {0} > {1} or len(set(lengths) - {0}) > 1, lengths  # chains of varying length ...
    assert any(len(set(step)) > 1 for step in steps)  # ... within one step, for requests drafted together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (vLLM's clean shutdown), then a kill if it is not down within STOP_SECONDS."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tail(path: str, lines: int = 30) -> str:
    return "\n".join(open(path, encoding="utf-8", errors="replace").read().splitlines()[-lines:])


@pytest.fixture(scope="module")
def server(vllm_pair, proposer_env, tmp_path_factory):
    """`vllm serve TARGET --speculative-config {sprinter}` on 127.0.0.1, as a user starts it (scripts/serve_vllm.py:
    the CPU wheel's `vllm` command cannot find its own version); stopped after the module."""
    env, _ = proposer_env
    port = free_port()
    log = (tmp_path_factory.mktemp("vllm-serve") / "serve.log").open("w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_vllm.py"), str(vllm_pair / "target"),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                             "--max-model-len", "256", "--seed", "0",
                             "--speculative-config", json.dumps(speculative_config())],
                            env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_START_SECONDS
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail(log.name)}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not answer within {SERVE_START_SECONDS} s:\n{tail(log.name)}")
            time.sleep(1)
        yield url, str(vllm_pair / "target")
    finally:
        stop(proc)
        log.close()
    assert proc.returncode is not None


def complete(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    reply.raise_for_status()
    return reply.json()["choices"][0]["text"]


def test_served_completions_concurrent_and_streamed_equal_plain_vllm(server, plain):
    url, model = server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:  # every prompt at once: the engine batches them
        texts = list(pool.map(lambda p: complete(url, model, p), PROMPTS))
    assert texts == [text for _, text in plain]
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True}
    pieces = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces.append(json.loads(line[len("data: "):])["choices"][0]["text"])
    assert len(pieces) > 1 and "".join(pieces) == plain[0][1]
