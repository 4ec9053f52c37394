"""llamaserve against llama.cpp's own `llama-server`: the same GGUF (the embedded model), the same threads, 16
slots of 4096 tokens each, both started here and measured in turns.

Workloads, each request streaming (`/v1/chat/completions`, `stream: true`) exactly `--tokens` output tokens (end
of generation banned: `ignore_eos` and a -100 `logit_bias` on the model's end tokens; the count is checked in the
stream's usage):
  c=N     N concurrent clients (`--clients`), each sending max(3, ceil(16 / N)) requests back to back, every
          request its own short prompt (its number first, so no two share more than the chat template)
  shared  16 clients at once, one ~300-token system prompt and a different question each, on a freshly started
          server of each kind (one warm-up request first, unrelated to the prompt)

Figures per workload: output tokens/s (all tokens over wall time), TTFT p50/p99, inter-token latency p50/p99,
measured by httpx clients in this process, each request on a new connection (llama-server closes its connection
after every streamed response anyway).
Each repetition runs every workload on every server in turn (the order reversed every other repetition, so neither
always goes first); the table gives the median of the repetitions with each repetition in brackets, and the ratio
llamaserve / llama-server (above 1 for tok/s: ours faster; below 1 for latencies: ours quicker).

The servers, as users run them:
  llamaserve    python -m llamaserve.cli serve --port P --threads T --parallel 16 --ctx 4096 --data-dir TMP
  llama-server  llama-server -m GGUF --port P -np 16 -c 65536 -t T   (its defaults: flash attention auto, which
                its log at -lv 4 shows enabled on CPU; batch 2048 / ubatch 512; the GGUF's chat template through
                jinja; its RAM prompt cache)
`--like-with-like` adds `llama-server -fa off -b 128 -ub 128` (our settings) and `llamaserve --batch 512` (its
ubatch), and ratios for those pairs: what is the engine and what its defaults.

    .venv/bin/python bench/vs_llama_server.py                      # 3 repetitions, c=1,4,16 and shared
    .venv/bin/python bench/vs_llama_server.py --reps 5 --like-with-like
    .venv/bin/python bench/vs_llama_server.py --llama-server ~/llama.cpp/build/bin/llama-server
    .venv/bin/python bench/vs_llama_server.py --variant='--batch 64'   # a third row: ours with other settings

Not part of CI: it takes tens of minutes, wants a quiet machine (llama.cpp's threads spin at barriers, so any other
busy process skews every figure), and the first run builds llama-server.

The build: without `--llama-server`, the llama.cpp vendored in the pinned llama-cpp-python's sdist (the version
installed here, so both engines run the same llama.cpp), built once with cmake (`llama-server` target only, at nice
19) and cached under ~/.cache/llamaserve-bench/llama_cpp_python-VERSION/vendor/llama.cpp/build (11 minutes on 2
busy cores here, 25 at worst; needs cmake and a C++ compiler; no web UI is embedded). Delete that folder to rebuild.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import (  # noqa: E402
    B_QUESTIONS,
    LONG_SYSTEM,
    TASKS,
    RequestResult,
    free_port,
    requests_per_client,
    stop,
    stream_body,
    summarize,
    table,
    wait_healthy,
)

CACHE = Path.home() / ".cache" / "llamaserve-bench"
CMAKE_OPTIONS = [
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
]
SLOTS = 16
CTX_PER_SLOT = 4096
SHARED = "shared"  # the shared-system-prompt workload's label
FIGURES = [  # (summary key, column header)
    ("tok_s", "output tok/s"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("ttft_p99_ms", "TTFT p99 ms"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
]


# --- building llama-server
def pinned_version() -> str:
    """The installed llama-cpp-python: the project pins it, and its vendored llama.cpp is the one we run."""
    return importlib.metadata.version("llama_cpp_python")


def llama_cpp_dir(version: str) -> Path:
    return CACHE / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"


def cached_binary(version: str) -> Path:
    return llama_cpp_dir(version) / "build" / "bin" / "llama-server"


def step(what: str, command: list[str], cwd: Path | None = None) -> None:
    """Run one build step at the lowest priority (the machine may be busy), its output passed through."""
    print(f"[build] {what}: {' '.join(command)}", flush=True)
    started = time.monotonic()
    subprocess.run(["nice", "-n", "19", *command], cwd=cwd, check=True)
    print(f"[build] {what} done in {time.monotonic() - started:.0f} s", flush=True)


def unpack_sdist(version: str) -> None:
    """The sdist from PyPI (through pip, so its cache serves), unpacked under CACHE."""
    sdist = CACHE / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        step("download sdist", [*pip, f"llama-cpp-python=={version}", "-d", str(CACHE)])
    print(f"[build] unpacking {sdist}", flush=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")


def build_llama_server(version: str) -> Path:
    """Configure and build the `llama-server` target only (11 to 25 minutes on 2 cores)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    source = llama_cpp_dir(version)
    if not (source / "CMakeLists.txt").exists():
        unpack_sdist(version)
    started = time.monotonic()
    step("configure", ["cmake", "-B", "build", *CMAKE_OPTIONS], cwd=source)
    jobs = str(os.cpu_count() or 2)
    step("compile", ["cmake", "--build", "build", "--target", "llama-server", "-j", jobs], cwd=source)
    print(f"[build] llama-server built in {(time.monotonic() - started) / 60:.1f} min", flush=True)
    return cached_binary(version)


def llama_server_binary(explicit: str | None) -> Path:
    """`--llama-server PATH` when given, else the cached build, built first when missing."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    version = pinned_version()
    binary = cached_binary(version)
    if binary.exists():
        return binary
    print(f"[build] no llama-server at {binary}: building it from llama-cpp-python {version}'s sdist", flush=True)
    return build_llama_server(version)


def llama_server_env(binary: Path) -> dict[str, str]:
    """Its build folder's shared libraries (libllama, libggml*) sit beside it and are not installed anywhere."""
    paths = [str(binary.parent), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(paths)}


def llama_server_version(binary: Path) -> str:
    out = subprocess.run(
        [str(binary), "--version"], env=llama_server_env(binary), capture_output=True, text=True, timeout=60
    )
    return " ".join(line.strip() for line in (out.stdout + out.stderr).splitlines() if "version" in line)


# --- the servers
@dataclass(frozen=True)
class Target:
    name: str  # its row in the tables
    kind: str  # "llamaserve" or "llama-server"
    extra: tuple[str, ...] = ()


OURS = Target("llamaserve", "llamaserve")
THEIRS = Target("llama-server", "llama-server")
OURS_BIG_BATCH = Target("llamaserve --batch 512", "llamaserve", ("--batch", "512"))
THEIRS_OUR_SETTINGS = Target(
    "llama-server -fa off -b 128 -ub 128", "llama-server", ("-fa", "off", "-b", "128", "-ub", "128")
)


@dataclass(frozen=True)
class Setup:
    gguf: Path
    binary: Path
    threads: int
    tokens: int
    eog: tuple[int, ...]  # the model's end-of-generation tokens, banned


@dataclass
class Running:
    target: Target
    base: str
    headers: dict[str, str]
    model: str


def command_of(target: Target, setup: Setup, port: int, data_dir: Path) -> list[str]:
    if target.kind == "llamaserve":
        cmd = [sys.executable, "-m", "llamaserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--threads", str(setup.threads), "--parallel", str(SLOTS), "--ctx", str(CTX_PER_SLOT)]
        return [*cmd, "--data-dir", str(data_dir), *target.extra]
    cmd = [str(setup.binary), "-m", str(setup.gguf), "--host", "127.0.0.1", "--port", str(port)]
    return [*cmd, "-np", str(SLOTS), "-c", str(SLOTS * CTX_PER_SLOT), "-t", str(setup.threads), *target.extra]


@contextlib.contextmanager
def launch(target: Target, setup: Setup) -> Iterator[Running]:
    """TARGET on a free port until the block ends, in a temporary data dir (so llamaserve's first-start key is
    ours); yields once /health answers 200. Its log is shown if it fails to start or the block fails."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="vs_llama_server_") as tmp:
        data_dir = Path(tmp) / "data"
        data_dir.mkdir()
        command = command_of(target, setup, port, data_dir)
        env = llama_server_env(setup.binary) if target.kind == "llama-server" else None
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            base = f"http://127.0.0.1:{port}"
            try:
                wait_healthy(base, proc, timeout=300)
                headers: dict[str, str] = {}
                if target.kind == "llamaserve":
                    headers["Authorization"] = f"Bearer {(data_dir / 'default.key').read_text().strip()}"
                model = httpx.get(f"{base}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
                yield Running(target, base, headers, model)
            except BaseException:
                tail = log_path.read_text(errors="replace")[-3000:]
                state = "running" if proc.poll() is None else f"exited with code {proc.returncode}"
                print(f"--- {target.name} ({state}) log ---\n{tail}", file=sys.stderr)
                raise
            finally:
                stop(proc)


def display_command(target: Target, setup: Setup) -> str:
    return " ".join(command_of(target, setup, 0, Path("TMP"))).replace("--port 0", "--port P")


def eog_tokens(gguf: Path) -> tuple[int, ...]:
    """The end-of-generation tokens, from the vocabulary alone (no weights loaded)."""
    from llamaserve.engine.llama import LlamaModel

    vocab = LlamaModel(str(gguf), None)
    try:
        return tuple(t for t in range(vocab.n_vocab) if vocab.is_eog(t))
    finally:
        vocab.close()


# --- streaming clients
def chat_body(setup: Setup, model: str, messages: list[dict[str, str]], tokens: int) -> dict[str, Any]:
    """Greedy, exactly `tokens` tokens: both servers take `ignore_eos` and an OpenAI `logit_bias`; both are sent
    so neither can stop early whichever it honours."""
    return {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": tokens,
        "ignore_eos": True,
        "logit_bias": {str(t): -100 for t in setup.eog},
    }


async def run_clients(
    server: Running, setup: Setup, clients: int, per_client: int, messages: Callable[[int], list[dict[str, str]]]
) -> tuple[list[RequestResult], float]:
    """`clients` coroutines sending `per_client` requests each, back to back. Returns the results and wall time."""
    # A new connection per request, for both: llama-server closes the connection after every streamed response
    # (its chunk provider ends with sink.done() and `return false`, which cpp-httplib takes for a cancel) without
    # saying `Connection: close`, so a kept-alive connection races with that close and fails now and then.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits, headers=server.headers) as client:

        async def one_client(c: int) -> list[RequestResult]:
            bodies = [
                chat_body(setup, server.model, messages(c * per_client + i), setup.tokens) for i in range(per_client)
            ]
            return [await stream_body(client, server.base, body) for body in bodies]

        t0 = time.perf_counter()
        per = await asyncio.gather(*(one_client(c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return [r for rs in per for r in rs], wall


def measure(
    server: Running, setup: Setup, clients: int, per_client: int, messages: Callable[[int], list[dict[str, str]]]
) -> dict[str, Any]:
    results, wall = asyncio.run(run_clients(server, setup, clients, per_client, messages))
    wrong = sum(r.output_tokens != setup.tokens for r in results)
    return summarize(results, wall) | {"wrong_token_counts": wrong}


def warm_up(server: Running, setup: Setup) -> None:
    """One small request: the first decode's allocations and graph, the weights' pages."""
    body = chat_body(setup, server.model, [{"role": "user", "content": "Hi"}], 4)

    async def go() -> None:
        async with httpx.AsyncClient(timeout=600, headers=server.headers) as client:
            await stream_body(client, server.base, body)

    asyncio.run(go())


# --- workloads
def short_prompt(nonce: str) -> Callable[[int], list[dict[str, str]]]:
    """Request n's chat: its number first, so no two prompts share more than the chat template's few tokens."""
    return lambda n: [{"role": "user", "content": f"Request {nonce}-{n}. {TASKS[n % len(TASKS)]}"}]


def shared_prompt(nonce: str) -> Callable[[int], list[dict[str, str]]]:
    system = f"Session {nonce}. {LONG_SYSTEM}"  # the nonce first: nothing of it can be cached already
    return lambda n: [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Ticket {n}: {B_QUESTIONS[n % len(B_QUESTIONS)]}"},
    ]


Results = dict[str, dict[str, list[dict[str, Any]]]]  # workload -> target name -> one summary per repetition


def in_turns(targets: list[Target], rep: int) -> list[Target]:
    """Every other repetition in reverse (ours, theirs, theirs, ours, ...): neither always runs first."""
    return targets if rep % 2 == 0 else targets[::-1]


def run_concurrency(targets: list[Target], setup: Setup, args: argparse.Namespace, results: Results) -> None:
    """All targets up at once (an idle server waits on a condition, not a core), taking turns per workload."""
    with contextlib.ExitStack() as stack:
        servers = {t.name: stack.enter_context(launch(t, setup)) for t in targets}
        for server in servers.values():
            warm_up(server, setup)
        for rep in range(args.reps):
            for clients in args.clients:
                for target in in_turns(targets, rep):
                    per = requests_per_client(clients, None)
                    s = measure(servers[target.name], setup, clients, per, short_prompt(uuid.uuid4().hex[:8]))
                    results.setdefault(f"c={clients}", {}).setdefault(target.name, []).append(s)
                    progress(rep, f"c={clients}", target, s)


def run_shared(targets: list[Target], setup: Setup, args: argparse.Namespace, results: Results) -> None:
    """Each target freshly started per repetition: a cold prefix cache, 16 clients at once."""
    for rep in range(args.reps):
        nonce = uuid.uuid4().hex[:8]
        for target in in_turns(targets, rep):
            with launch(target, setup) as server:
                warm_up(server, setup)
                s = measure(server, setup, SLOTS, 1, shared_prompt(nonce))
            results.setdefault(SHARED, {}).setdefault(target.name, []).append(s)
            progress(rep, SHARED, target, s)


def progress(rep: int, workload: str, target: Target, s: dict[str, Any]) -> None:
    wrong = f", {s['wrong_token_counts']} with the wrong token count" if s["wrong_token_counts"] else ""
    print(
        f"  rep {rep + 1} {workload:>7} {target.name:<36} {s['tok_s']:7.1f} tok/s  TTFT p50 {s['ttft_p50_ms']} ms"
        f"  ITL p50 {s['itl_p50_ms']} ms{wrong}",
        flush=True,
    )


# --- report
def median_cell(values: list[float]) -> str:
    shown = " ".join(f"{v:.1f}" for v in values)
    return f"{statistics.median(values):.1f} [{shown}]" if len(values) > 1 else f"{values[0]:.1f}"


def ratio_cell(ours: list[float], theirs: list[float]) -> str:
    a, b = statistics.median(ours), statistics.median(theirs)
    return f"{a / b:.2f}" if b else "-"


def pairs_of(targets: list[Target]) -> list[tuple[Target, Target, str]]:
    """(ours, theirs, what they share) for each ratio row."""
    pairs = [(OURS, THEIRS, "each with its defaults")]
    if THEIRS_OUR_SETTINGS in targets:
        pairs.append((OURS, THEIRS_OUR_SETTINGS, "same settings: batch 128, no flash attention"))
        pairs.append((OURS_BIG_BATCH, THEIRS, "same ubatch 512; theirs flash attention auto"))
    pairs += [
        (t, THEIRS, "theirs with its defaults")
        for t in targets
        if t.kind == "llamaserve" and t not in (OURS, OURS_BIG_BATCH)  # the --variant ones
    ]
    return pairs


def report_workload(workload: str, by_target: dict[str, list[dict[str, Any]]], targets: list[Target]) -> None:
    title = "16 clients, shared ~300-token system prompt, fresh servers" if workload == SHARED else workload
    print(f"\n## {title}\n")
    headers = ["server", *(h for _, h in FIGURES), "prompt tok", "requests", "wrong count"]
    rows: list[list[Any]] = []
    for t in targets:
        reps = by_target[t.name]
        figures = [median_cell([r[k] for r in reps]) for k, _ in FIGURES]
        wrong = sum(r["wrong_token_counts"] for r in reps)
        rows.append([t.name, *figures, reps[0]["prompt_tokens_per_request"], reps[0]["requests"], wrong])
    for ours, theirs, what in pairs_of(targets):
        a, b = by_target[ours.name], by_target[theirs.name]
        ratios = [ratio_cell([r[k] for r in a], [r[k] for r in b]) for k, _ in FIGURES]
        rows.append([f"ratio {ours.name} / {theirs.name} ({what})", *ratios, "", "", ""])
    print(table(headers, rows))


def report(setup: Setup, args: argparse.Namespace, targets: list[Target], results: Results) -> None:
    print(f"\n## Setup\n\nmodel {setup.gguf.name}, threads {setup.threads}, {setup.tokens} output tokens a request")
    print(f"(end tokens {list(setup.eog)} banned), {args.reps} repetitions; llama-server {setup.binary}")
    print(f"{llama_server_version(setup.binary)}; loadavg 1-min now {os.getloadavg()[0]:.2f}")
    for t in targets:
        print(f"  {t.name}: {display_command(t, setup)}")
    print("\nCells: median [each repetition]. Ratios: medians, llamaserve / llama-server (tok/s: >1 is ours faster;")
    print("latencies: <1 is ours quicker). wrong count: requests whose usage did not say exactly the tokens asked.")
    for workload, by_target in results.items():
        report_workload(workload, by_target, targets)


# --- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3, help="repetitions, interleaved across servers")
    p.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 4, 16],
        help="comma-separated concurrencies (empty: none)",
    )
    p.add_argument("--tokens", type=int, default=64, help="output tokens of every request (end tokens banned)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads of both servers")
    p.add_argument("--skip-shared", action="store_true", help="skip the shared-system-prompt cold start")
    p.add_argument(
        "--like-with-like",
        action="store_true",
        help="also llama-server with our settings (-fa off -b 128 -ub 128) and llamaserve with its batch (512)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="ARGS",
        help="also llamaserve with these extra arguments, e.g. --variant='--batch 64' (repeatable)",
    )
    p.add_argument("--llama-server", metavar="PATH", help="a prebuilt llama-server (default: build and cache one)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write every repetition's figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the servers are stopped
    from llamaserve.config import resolve_model

    gguf, _ = resolve_model(None)
    binary = llama_server_binary(args.llama_server)
    setup = Setup(gguf, binary, args.threads, args.tokens, eog_tokens(gguf))
    if (load := os.getloadavg()[0]) > 0.5:
        print(f"warning: 1-min load average is {load:.2f}; figures may be noisy", file=sys.stderr)
    targets = [OURS, THEIRS]
    if args.like_with_like:
        targets += [OURS_BIG_BATCH, THEIRS_OUR_SETTINGS]
    targets += [Target(f"llamaserve {extra}", "llamaserve", tuple(extra.split())) for extra in args.variant]
    results: Results = {}
    if args.clients:
        print(f"concurrency workloads {args.clients}, {args.reps} repetitions ...", flush=True)
        run_concurrency(targets, setup, args, results)
    if not args.skip_shared:
        print("shared-system-prompt cold start ...", flush=True)
        run_shared(targets, setup, args, results)
    report(setup, args, targets, results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
