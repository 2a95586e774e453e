"""The sampler library's statistics against their known answers (no BPF involved).

tests/fixtures/heap_sampler_stats.c runs under LD_PRELOAD and allocates blocks of known sizes;
the library's own counters say how many it sampled. With sampling points a Poisson process of
rate 1/mean over the bytes allocated, a block of s bytes is sampled with probability
p = 1 - exp(-s/mean): the count of a phase of n blocks is binomial(n, p), and the agent's
weight ``sample_weight`` (1/p) turns it back into n. Bounds are four standard deviations;
the library takes a fixed seed, so each run makes the same decisions and cannot flake.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.actors.heap import sample_weight
from agent.heap_sampler import DEFAULT_SAMPLE_BYTES, ENV_SAMPLE_BYTES, ENV_SEED, build_library

FIXTURE = Path(__file__).parent / "fixtures" / "heap_sampler_stats.c"


@pytest.fixture(scope="module")
def stats_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("heap_sampler") / "heap_sampler_stats"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(FIXTURE)], check=True)
    return out


def run_preloaded(program: list[str], **env: str) -> str:
    full_env = {**os.environ, "LD_PRELOAD": str(build_library()), **env}
    return subprocess.run(program, env=full_env, capture_output=True, text=True, check=True, timeout=120).stdout


def parse(out: str) -> dict[str, list[int]]:
    """First word of each line -> the numbers on it."""
    return {line.split()[0] + (line.split()[1] if line.startswith("size") else ""):
            [int(w) for w in line.split()[1:] if w.isdigit()] for line in out.splitlines()}


def within_binomial(sampled: int, n: int, p: float) -> bool:
    return abs(sampled - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("mean", [DEFAULT_SAMPLE_BYTES, 64 * 1024])
def test_sampled_counts_and_weights_match_poisson_sampling(stats_program: Path, mean: int) -> None:
    env = {ENV_SEED: "11"} if mean == DEFAULT_SAMPLE_BYTES else {ENV_SEED: "11", ENV_SAMPLE_BYTES: str(mean)}
    phases = parse(run_preloaded([str(stats_program)], **env))
    assert phases["mean"] == [mean]
    true_bytes = estimated_bytes = 0.0
    for size in (16, 4096, 100000, 4 << 20):
        _, n, sampled = phases[f"size{size}"]
        p = -math.expm1(-size / mean)
        assert within_binomial(sampled, n, p), (size, sampled, n * p)
        # The agent's weight makes the count unbiased: sampled x weight estimates n.
        estimate = sampled * sample_weight(size, mean)
        assert abs(estimate - n) <= 4 * math.sqrt(n * (1 - p) / p) + sample_weight(size, mean), (size, estimate, n)
        true_bytes += n * size
        estimated_bytes += estimate * size
    assert abs(estimated_bytes - true_bytes) <= 0.05 * true_bytes
    # Mean sampling interval: bytes allocated per sample. For blocks of s bytes it is
    # s / (1 - exp(-s/mean)): the mean itself plus s/2 to first order.
    _, n, sampled = phases["size4096"]
    interval = 4096 / -math.expm1(-4096 / mean)
    assert abs(n * 4096 / sampled - interval) <= 4 * interval / math.sqrt(sampled), (n * 4096 / sampled, interval)


def test_threads_and_every_allocation_function(stats_program: Path) -> None:
    phases = parse(run_preloaded([str(stats_program)], **{ENV_SEED: "5"}))
    n, sampled = phases["threads"]
    assert within_binomial(sampled, n, -math.expm1(-256 / DEFAULT_SAMPLE_BYTES)), (sampled, n)
    # calloc 4096, realloc to 8192 and to 100, three aligned allocators of 4096: per round.
    sizes = (4096, 8192, 100, 4096, 4096, 4096)
    expected = 20000 * sum(-math.expm1(-s / DEFAULT_SAMPLE_BYTES) for s in sizes)
    sampled, freed = phases["apis"]
    assert abs(sampled - expected) <= 4 * math.sqrt(expected), (sampled, expected)
    # Everything was freed (reallocs included): each sampled block's free was reported once.
    total, total_freed, set_full = phases["total"]
    assert freed == sampled and total_freed == total and set_full == 0


def test_sampling_off_samples_nothing(stats_program: Path) -> None:
    phases = parse(run_preloaded([str(stats_program)], **{ENV_SAMPLE_BYTES: "0"}))
    assert phases["mean"] == [0]
    assert phases["total"] == [0, 0, 0]


def test_a_threaded_interpreter_runs_unchanged_under_the_library() -> None:
    script = ("import json, threading\n"
              "out = []\n"
              "def work(i): out.append(len(json.dumps([{'k': str(j) * (j % 50)} for j in range(20000)])))\n"
              "ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]\n"
              "[t.start() for t in ts]; [t.join() for t in ts]\n"
              "print(sorted(out))\n")
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert run_preloaded([sys.executable, "-c", script], **{ENV_SAMPLE_BYTES: "4096"}) == plain
