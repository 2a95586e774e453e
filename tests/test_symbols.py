"""Symbolizer against a real running process whose ground truth it prints itself."""

from __future__ import annotations

import gc
import shutil
import subprocess
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.symbols import Symbolizer
from shared.model import FrameType

FIXTURE = Path(__file__).parent / "fixtures" / "symbols_target.c"


def build(tmp: Path, *flags: str, name: str = "target") -> Path:
    out = tmp / name
    subprocess.run(["gcc", "-g", "-O0", "-fno-omit-frame-pointer", *flags, "-o", str(out), str(FIXTURE)], check=True)
    return out


class Target:
    def __init__(self, exe: Path) -> None:
        self.proc = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.truth: dict[str, tuple[int, int]] = {}
        assert self.proc.stdout is not None
        while len(self.truth) < 3:
            name, addr, line = self.proc.stdout.readline().split()
            self.truth[name] = (int(addr, 16), int(line))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(5)


def file_offset(pid: int, address: int) -> int:
    """Ground truth from the kernel: the file offset ``address`` maps, per /proc/PID/maps."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return address - lo + int(fields[2], 16)
    raise AssertionError(f"{address:#x} is not mapped in {pid}")


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Target]:
    t = Target(build(tmp_path))
    yield t
    t.stop()


def test_functions_files_and_lines(target: Target) -> None:
    sym = Symbolizer()
    leaf_addr, leaf_line = target.truth["leaf_function"]
    caller_addr, caller_line = target.truth["caller_function"]
    # Leaf first; the caller's address is treated as a return address (looked up at addr-1),
    # so pass addr+1 to land exactly on the labelled instruction.
    leaf, caller = sym.symbolize_user(target.pid, [leaf_addr, caller_addr + 1])
    assert (leaf.function, leaf.line) == ("leaf_function", leaf_line)
    assert (caller.function, caller.line) == ("caller_function", caller_line)
    assert leaf.filename == str(FIXTURE) and leaf.frame_type == FrameType.NATIVE
    # Module-relative: the file offset, and the mapping in file-offset space.
    assert leaf.address == file_offset(target.pid, leaf_addr) != leaf_addr and leaf.mapping is not None
    assert leaf.mapping.start <= leaf.address < leaf.mapping.limit and leaf.mapping.offset == leaf.mapping.start
    assert leaf.mapping.filename.endswith("/target") and len(leaf.mapping.build_id) == 40


def test_shared_library_symbol(target: Target) -> None:
    (frame,) = Symbolizer().symbolize_user(target.pid, [target.truth["getpid"][0]])
    assert "getpid" in frame.function
    assert frame.mapping is not None and "libc" in frame.mapping.filename


def test_stripped_binary_keeps_mapping_without_error(tmp_path: Path) -> None:
    exe = build(tmp_path)
    stripped = tmp_path / "stripped"
    shutil.copy(exe, stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    t = Target(stripped)
    try:
        sym = Symbolizer()
        (frame,) = sym.symbolize_user(t.pid, [t.truth["leaf_function"][0]])
        assert frame.function == "" and frame.line == 0
        assert frame.mapping is not None and frame.mapping.filename.endswith("/stripped")
        assert frame.address == file_offset(t.pid, t.truth["leaf_function"][0])
    finally:
        t.stop()


def test_exited_and_unknown_processes_give_unknown_frames(tmp_path: Path) -> None:
    sym = Symbolizer()
    proc = subprocess.Popen(["true"])
    proc.wait()
    frames = sym.symbolize_user(proc.pid, [0x401000, 0x402000])
    assert [f.address for f in frames] == [0x401000, 0x402000]
    assert all(f.function == "" for f in frames)
    assert sym.symbolize_user(2**22 + 12345, [1]) [0].function == ""


def test_symbols_survive_process_exit_within_a_batch(target: Target) -> None:
    sym = Symbolizer()
    leaf_addr, _ = target.truth["leaf_function"]
    assert sym.symbolize_user(target.pid, [leaf_addr])[0].function == "leaf_function"
    target.stop()
    # The process is gone; what was read while it lived still symbolizes its samples.
    assert sym.symbolize_user(target.pid, [leaf_addr])[0].function == "leaf_function"


def test_exited_processes_are_forgotten_after_the_grace_period(target: Target) -> None:
    """Dead processes' maps do not wait for LRU eviction (a host runs many short-lived ones),
    but samples that arrive shortly after an exit still symbolize."""
    sym = Symbolizer()
    leaf_addr, _ = target.truth["leaf_function"]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        sym.symbolize_user(sleeper.pid, [1])
        assert sym.symbolize_user(target.pid, [leaf_addr])[0].function == "leaf_function"
        target.stop()
        assert sym.sweep_exited(grace_s=5.0) == 0  # within the grace period
        assert sym.symbolize_user(target.pid, [leaf_addr])[0].function == "leaf_function"
        frames_before = sym.stats["frames_cached"]
        assert sym.sweep_exited(grace_s=0.0) == 1  # the exited target only, not the sleeper
        assert sym.stats["processes_cached"] == 1
        assert sym.stats["frames_cached"] < frames_before  # its resolved frames went with it
    finally:
        sleeper.kill()
        sleeper.wait()


def test_file_cache_is_shared_and_bounded(tmp_path: Path) -> None:
    exe = build(tmp_path)
    targets = [Target(exe) for _ in range(3)]
    try:
        sym = Symbolizer(max_files=2, max_processes=2)
        for t in targets:
            assert sym.symbolize_user(t.pid, [t.truth["leaf_function"][0]])[0].function == "leaf_function"
        stats = sym.stats
        assert stats["file_cache_misses"] == 1  # one parse of the binary for three processes
        assert stats["processes_cached"] <= 2 and stats["files_cached"] <= 2
    finally:
        for t in targets:
            t.stop()


def test_idle_files_are_closed_and_freed_and_read_again_when_needed(tmp_path: Path) -> None:
    """A file no lookup needed for the idle time is closed and its tables freed (the build-id
    index holds it only weakly); a later sample of a new address reads it again."""
    exe = build(tmp_path, "-Wl,--build-id")
    target = Target(exe)
    try:
        sym = Symbolizer()
        leaf_addr, _ = target.truth["leaf_function"]
        assert sym.symbolize_user(target.pid, [leaf_addr])[0].function == "leaf_function"
        files = [f for f in sym._files.values()]
        assert len(files) == 1
        parsed = weakref.ref(files[0])
        assert sym.sweep_idle_files(idle_s=60.0) == 0  # just used
        assert sym.sweep_idle_files(idle_s=0.0) == 1
        del files
        gc.collect()
        assert parsed() is None, "the closed file's tables are still referenced"
        assert sym.stats["files_cached"] == 0
        caller_addr, _ = target.truth["caller_function"]  # not in the frame cache: needs the file
        assert sym.symbolize_user(target.pid, [caller_addr])[0].function == "caller_function"
        assert sym.stats["file_cache_misses"] == 2
    finally:
        target.stop()


def test_copies_of_one_build_share_line_tables_but_stripped_copies_do_not(tmp_path: Path) -> None:
    # Same library in several venvs/images: identical files at different paths (inodes).
    exe = build(tmp_path, "-Wl,--build-id")
    copy = tmp_path / "copy"
    shutil.copy(exe, copy)
    stripped = tmp_path / "stripped"
    shutil.copy(exe, stripped)
    subprocess.run(["strip", str(stripped)], check=True)
    targets = [Target(exe), Target(copy), Target(stripped)]
    try:
        sym = Symbolizer()
        frames = [sym.symbolize_user(t.pid, [t.truth["leaf_function"][0]])[0] for t in targets]
        line = targets[0].truth["leaf_function"][1]
        assert [(f.function, f.line) for f in frames] == [("leaf_function", line), ("leaf_function", line), ("", 0)]
        # Each copy keeps its own mapping; the parsed file (and its line table) is shared.
        assert frames[1].mapping is not None and frames[1].mapping.filename.endswith("/copy")
        assert sym.stats["file_cache_misses"] == 3 and sym.stats["build_id_shares"] == 1
    finally:
        for t in targets:
            t.stop()


def test_kernel_symbols() -> None:
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, kind, name = line.split()[:3]
            if kind in "tT" and name == "schedule":
                break
    (frame,) = Symbolizer().symbolize_kernel([int(addr, 16) + 4])
    assert frame.function == "schedule" and frame.frame_type == FrameType.KERNEL


def test_exec_after_first_sight_is_noticed() -> None:
    """A process seen between fork and exec must not keep its pre-exec maps and name."""
    import sys

    from agent.symbols.symbolizer import IDENTITY_CHECK_S

    child = subprocess.Popen([sys.executable, "-c",
                              "import os, time; time.sleep(0.5); os.execv('/bin/sleep', ['sleep', '5'])"])
    try:
        sym = Symbolizer()
        assert sym.process_name(child.pid).startswith("python")
        time.sleep(0.5 + IDENTITY_CHECK_S + 0.5)
        assert sym.process_name(child.pid) == "sleep"
    finally:
        child.kill()
        child.wait()


def test_vdso_frames_are_named() -> None:
    """clock_gettime and friends run in the vDSO, which no file backs: named from memory."""
    import sys

    from agent.process.procmaps import read_maps

    child = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); time.sleep(5)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        child.stdout.readline()  # exec'd and running: its maps are its own, with the vDSO
        vdso = next(e for e in read_maps(child.pid) if e.path == "[vdso]")
        sym = Symbolizer()
        names = set()
        for address in range(vdso.start, vdso.end, 16):
            frame = sym.symbolize_user(child.pid, [address])[0]
            names.add(frame.function)
        assert any("clock_gettime" in n for n in names), sorted(names)[:20]
    finally:
        child.kill()
        child.wait()


def test_mapped_files_are_stated_once_per_ttl_not_per_process(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import agent.process.procmaps as procmaps_module
    import agent.symbols.symbolizer as symbolizer_module

    exe = build(tmp_path)
    targets = [Target(exe) for _ in range(3)]
    try:
        stats: list[str] = []
        real_stat = symbolizer_module.os.stat

        def counting_stat(path: str, *args: object, **kwargs: object) -> object:
            if not str(path).endswith("/exe"):  # the process identity's own check, once per process
                stats.append(str(path))
            return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(symbolizer_module.os, "stat", counting_stat)
        sym = Symbolizer()
        per_process = []
        for t in targets:
            before = len(stats)
            assert sym.symbolize_user(t.pid, [t.truth["leaf_function"][0]])[0].function == "leaf_function"
            per_process.append(len(stats) - before)
        # The first process stats each of its mapped files; the others map the same files.
        assert per_process[0] >= 2 and per_process[1:] == [0, 0], per_process
        monkeypatch.setattr(procmaps_module, "FILE_STAT_TTL_S", 0.0)  # expired: stat'ed again
        sym2_before = len(stats)
        sym._process(targets[0].pid, force=True)
        assert len(stats) > sym2_before
    finally:
        for t in targets:
            t.stop()


def test_file_cache_is_bounded_by_bytes_too(tmp_path: Path) -> None:
    # Two binary files whose tables together exceed the budget: only the newest stays
    # cached, and each symbolizes correctly.
    targets = [Target(build(tmp_path, name="one")), Target(build(tmp_path, "-DVARIANT=2", name="two"))]
    try:
        sym = Symbolizer(max_file_bytes=1)
        for t in targets:
            assert sym.symbolize_user(t.pid, [t.truth["leaf_function"][0]])[0].function == "leaf_function"
            assert sym.stats["files_cached"] == 1
        assert sym.stats["evictions"] == 1 and sym.stats["file_cache_misses"] == 2
    finally:
        for t in targets:
            t.stop()


def test_kernel_symbols_compact_table_matches_kallsyms(tmp_path: Path) -> None:
    """Unsorted input, data symbols left out, module names kept, lookups between symbols."""
    from agent.symbols.kallsyms import KernelSymbols

    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("ffffffff81000200 T second\n"
                        "ffffffff81000100 t first\n"
                        "ffffffff81000150 D some_data\n"
                        "ffffffffc0000000 t mod_fn\t[nf_tables]\n"
                        "0000000000000000 T hidden\n")
    table = KernelSymbols(str(kallsyms))
    assert table.usable and len(table) == 3
    assert table.lookup(0xFFFFFFFF81000100) == "first"
    assert table.lookup(0xFFFFFFFF81000180) == "first"  # the data symbol does not end a function
    assert table.lookup(0xFFFFFFFF81000204) == "second"
    assert table.lookup(0xFFFFFFFFC0000010) == "mod_fn [nf_tables]"
    assert table.lookup(0xFFFFFFFF81000000) == ""


def test_kernel_symbols_without_addresses_are_unusable(tmp_path: Path) -> None:
    from agent.symbols.kallsyms import KernelSymbols

    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text("0000000000000000 T hidden\n")
    assert not KernelSymbols(str(kallsyms)).usable
    assert not KernelSymbols(str(tmp_path / "missing")).usable


def test_repeated_raw_stacks_are_symbolized_once(target: Target) -> None:
    """The ring-buffer actors keep symbolized stacks by raw addresses: a hot loop's repeats
    cost no symbolizer lookups; stacks with unknown frames or a stack copy are not kept."""
    from concurrent.futures import ThreadPoolExecutor
    from typing import Any

    from agent.actors.base import ActorContext, BpfActor
    from agent.actors.sources import RingBufferSource
    from agent.bpf.records import RawStackEvent
    from agent.clock import MonotonicToUnix
    from agent.settings import AgentSettings
    from shared.counters import Counters
    from shared.profile_types import ProfileType

    class Actor(BpfActor[bytes]):
        profile_type = ProfileType.CPU
        bpf_source = "cpu.bpf.c"

        def __init__(self, ctx: ActorContext) -> None:
            super().__init__(ctx, RingBufferSource.of(ctx, self.profile_type))  # no Python frames

        def attach(self, bpf: Any) -> None:
            pass

        def period(self) -> int:
            return 1

        def to_samples(self, records: list[bytes]) -> list[Any]:
            return []

    sym = Symbolizer()
    ctx = ActorContext(AgentSettings(), sym, ThreadPoolExecutor(1), None, Counters(),  # type: ignore[arg-type]
                       MonotonicToUnix())
    actor = Actor(ctx)
    leaf, _ = target.truth["leaf_function"]
    caller, _ = target.truth["caller_function"]

    def event(user: list[int], copy: bytes = b"") -> RawStackEvent:
        return RawStackEvent(0, 1, 0, target.pid, target.pid, 0, 0, "target", user, [], 0, 0, 0, copy)

    first = actor.frames(event([leaf, caller + 1]))
    lookups = sym.stats["lookups"]
    assert actor.frames(event([leaf, caller + 1])) is first  # from the cache: no lookups
    assert sym.stats["lookups"] == lookups
    assert [f.function for f in first] == ["leaf_function", "caller_function"]
    actor.frames(event([leaf, 0x10]))  # an unknown frame: symbolized again next time
    actor.frames(event([leaf, 0x10]))
    actor.frames(event([leaf, caller + 1], copy=b"\0" * 64))  # a stack copy: scanned every time
    assert sym.stats["lookups"] > lookups + 4


def test_maps_of_identical_text_are_parsed_once() -> None:
    """A forked child has its parent's maps text: its maps come from the parse cache, and a
    process whose maps differ gets its own."""
    import os

    from agent.process.procmaps import read_maps

    child = os.fork()
    if child == 0:  # pragma: no cover - the child only sleeps
        time.sleep(5)
        os._exit(0)
    try:
        mine = read_maps(os.getpid())
        assert read_maps(child) is mine  # the same text, parsed once
        assert any(e.path.endswith(("python3", "python3.11")) or "python" in e.path for e in mine)
        sleeper = subprocess.Popen(["sleep", "5"])
        try:
            # Right after exec the new image may not be mapped yet (one CI run read only
            # [vsyscall]): wait until it is, then compare.
            deadline = time.monotonic() + 5
            other = read_maps(sleeper.pid)
            while not any("sleep" in e.path for e in other) and time.monotonic() < deadline:
                time.sleep(0.05)
                other = read_maps(sleeper.pid)
            assert other is not mine and any("sleep" in e.path for e in other)
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        os.kill(child, 9)
        os.waitpid(child, 0)


def test_process_name_of_a_process_never_symbolized_reads_no_maps() -> None:
    """Naming a process (wall and lock entries of every process that switched or waited) reads
    its /proc/PID/stat, not its maps; the name is the kernel's comm even with parentheses and
    spaces in it (stat puts comm between parentheses)."""
    import sys

    from agent.process.procmaps import start_time, stat_identity

    child = subprocess.Popen([sys.executable, "-c",
                              "open('/proc/self/comm', 'w').write('a) (b c'); import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "a) (b c":
            assert time.monotonic() < deadline, "the child did not rename itself"
            time.sleep(0.02)
        assert stat_identity(child.pid) == (start_time(child.pid), "a) (b c")
        sym = Symbolizer()
        assert sym.process_name(child.pid) == "a) (b c"
        assert sym.stats["maps_reads"] == 0
    finally:
        child.kill()
        child.wait()
