"""Runtime profile variables found from code (agent/runtimes/go/heap_code.py), for stripped binaries.

Ground truth is the toolchain's own ``go tool nm``: for every installed toolchain the
go_heap workload is built plain, and the addresses found from its code (ignoring its symbol
table) must equal nm's. Its stripped build (``-ldflags=-s -w``) must be read from code with
every variable found; that those addresses are right in the stripped build too is shown by
integration/test_go_heap_profile.py, where its profile matches the program's own pprof.
A stripped binary whose rules find no single answer, or of a release whose rules were not
checked, is reported (UnsupportedBinary, reason ``stripped``), never guessed.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.runtimes.go.buildinfo import go_version
from agent.runtimes.go.heap import MPROF_LAYOUTS, SYMBOLS, UnsupportedBinary, find_runtime_symbols, profile_symbols
from agent.runtimes.go.heap_code import CHECKED_MINORS, find_from_code
from agent.runtimes.go.layout import go_minor
from integration.go_toolchains import GoToolchain, available, unidentifiable
from integration.harness import WORKLOADS
from stackfleet.nats_server import find_nats_server


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    out = tmp_path_factory.mktemp("go_heap_code")
    jobs = [(t, v) for t in available() for v in ("plain", "stripped")]

    def build(job: tuple[GoToolchain, str]) -> Path:
        toolchain, variant = job
        cache = Path("/tmp") / f"gocache-{toolchain.version}"  # shared with the integration builds
        return toolchain.build(WORKLOADS / "go_heap", out / f"{toolchain.minor}_{variant}", variant, cache=cache)

    with ThreadPoolExecutor(4) as pool:
        return {(t.version, v): exe for (t, v), exe in zip(jobs, pool.map(build, jobs), strict=True)}


def test_every_installed_release_is_checked() -> None:
    assert {t.minor for t in available()} == CHECKED_MINORS


@pytest.mark.parametrize("toolchain", available(), ids=lambda t: t.version)
def test_addresses_from_code_equal_go_tool_nm(builds: dict[tuple[str, str], Path], toolchain: GoToolchain) -> None:
    plain = builds[(toolchain.version, "plain")]
    nm = toolchain.tool("nm", str(plain))
    expected = {parts[2]: int(parts[0], 16) for parts in (line.split() for line in nm.splitlines())
                if len(parts) == 3 and parts[2] in SYMBOLS}
    assert len(expected) == len(SYMBOLS)
    with open(plain, "rb") as f:
        assert find_from_code(ELFFile(f), MPROF_LAYOUTS[toolchain.minor].ticks_val) == expected
    stripped = profile_symbols(str(builds[(toolchain.version, "stripped")]))
    assert stripped is not None and stripped.source == "code" and set(stripped.addresses) == set(SYMBOLS)
    with open(builds[(toolchain.version, "stripped")], "rb") as f:
        assert ELFFile(f).get_section_by_name(".symtab") is None


def test_unidentifiable_or_unchecked_stripped_binaries_are_reported(
        builds: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    toolchain = available()[-1]
    stripped = builds[(toolchain.version, "stripped")]
    with pytest.raises(UnsupportedBinary) as exc:
        profile_symbols(str(unidentifiable(stripped, tmp_path / "renamed")))
    assert exc.value.reason == "stripped" and "mProf_FlushLocked" in str(exc.value)
    # A release with a bucket layout but whose code rules were not checked (same length version).
    version = f"go{toolchain.version}".encode()
    unchecked = version.replace(f"1.{toolchain.minor}".encode(), b"1.24", 1)
    assert 24 in MPROF_LAYOUTS and 24 not in CHECKED_MINORS and len(unchecked) == len(version)
    data = stripped.read_bytes()
    (tmp_path / "unchecked").write_bytes(data.replace(version, unchecked))
    with pytest.raises(UnsupportedBinary) as exc:
        profile_symbols(str(tmp_path / "unchecked"))
    assert exc.value.reason == "stripped" and "not checked" in str(exc.value)
    # With its symbol table the same unchecked release is read as before.
    plain = builds[(toolchain.version, "plain")].read_bytes()
    (tmp_path / "unchecked_plain").write_bytes(plain.replace(version, unchecked))
    symbols = profile_symbols(str(tmp_path / "unchecked_plain"))
    assert symbols is not None and symbols.source == "symtab"


def test_a_large_real_program_too() -> None:
    """The shipped nats-server (tens of thousands of functions, built by its own release
    process): every rule still has exactly one answer, and it is the symbol table's."""
    path = find_nats_server()
    with open(path, "rb") as f:
        elf = ELFFile(f)
        minor = go_minor(go_version(elf))
        assert minor in CHECKED_MINORS, go_version(elf)
        from_code = find_from_code(elf, MPROF_LAYOUTS[minor].ticks_val)
        from_symtab = find_runtime_symbols(elf)
    assert set(from_code) == set(SYMBOLS)
    if from_symtab:  # this build kept its symbol table: the ground truth
        assert from_code == from_symtab
