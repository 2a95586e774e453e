"""CFI tables and the unwinder's walk against real compiled programs and Debian's libraries.

Ground truth never comes from our own parser:
- binutils' ``readelf --debug-dump=frames-interp`` interprets every FDE of libc, the dynamic
  loader and a test binary; each of its rows must give the same rule as our table;
- running programs are stopped with ptrace at random moments, their registers and stack
  copied, and walked with the same rules as bpf/unwind.h (agent/unwind/reference.py): the
  chain must be the one the program is built to have, each return address must sit right
  after a ``call`` of the frame below it, and an -O0 frame-pointer build must give exactly
  the frames its frame-pointer chain gives.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.process.procmaps import read_maps
from agent.symbols import Symbolizer
from agent.unwind.cache import TableCache, build_vdso_table
from agent.unwind.cfi import RowKind, parse_cfi
from agent.unwind.loader import (
    MAPPING_PENDING,
    PROC_SIZE,
    REQUEST_NEW,
    REQUEST_TABLE,
    REQUEST_UNKNOWN_ADDRESS,
    NativeUnwinder,
    RowAllocator,
    encode_process,
    encode_request,
)
from agent.unwind.reference import (
    MappedTable,
    StackCopy,
    bpf_mapping_lookup,
    bpf_row_lookup,
    process_tables,
    unwind,
)
from agent.unwind.table import ROW, TableTooLarge, build_table, merge_fdes
from shared.counters import Counters

WORKLOADS = Path(__file__).resolve().parents[1] / "integration" / "workloads"
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
LD_SO = "/lib64/ld-linux-x86-64.so.2"
CHAIN = ["hot_leaf", "chain_three", "chain_two", "chain_one", "main"]
NOFP = ("-O2", "-fomit-frame-pointer", "-g")


def build(tmp: Path, source: str, flags: tuple[str, ...], name: str | None = None) -> Path:
    out = tmp / (name or Path(source).stem)
    subprocess.run(["gcc", *flags, "-o", str(out), str(WORKLOADS / source)], check=True)
    return out


# -- tables against readelf ------------------------------------------------------------------

def _readelf_rules(path: str) -> Iterator[tuple[int, tuple[object, ...]]]:
    """(address, expected rule) for every row readelf's CFI interpreter prints for an FDE."""
    # -wN: do not follow debuglinks (a separate debug file has a NOBITS .eh_frame and fails the run)
    out = subprocess.run(["readelf", "-wN", "--debug-dump=frames-interp", path], capture_output=True, text=True,
                         check=True).stdout
    columns: list[str] | None = None
    in_fde = False
    for line in out.splitlines():
        if " FDE " in line:
            in_fde, columns = True, None
        elif " CIE" in line:
            in_fde = False
        elif line.strip().startswith("LOC"):
            columns = line.split()[1:]
        elif in_fde and columns and re.match(r"^[0-9a-f]{16} ", line):
            parts = re.sub(r" \(r\w+\)", "", line).split()
            yield int(parts[0], 16), _expected(dict(zip(columns, parts[1:], strict=False)))


def _expected(cols: dict[str, str]) -> tuple[object, ...]:
    ra = cols.get("ra", "u")
    if ra == "u":
        return ("END",)
    if ra != "c-8":
        return ("UNSUPPORTED",)
    rbp = cols.get("rbp", "u")
    if rbp in ("u", "s"):
        rbp_offset = 0
    elif rbp.startswith("c"):
        rbp_offset = int(rbp[1:])
    else:
        return ("UNSUPPORTED",)
    m = re.fullmatch(r"(rsp|rbp)([+-]\d+)", cols["CFA"])
    if m:
        return ("CFA_RSP" if m[1] == "rsp" else "CFA_RBP", int(m[2]), rbp_offset)
    if cols["CFA"] == "exp":
        return ("EXPRESSION", rbp_offset)
    return ("UNSUPPORTED",)


def _ours(kind: RowKind, cfa_offset: int, rbp_offset: int) -> tuple[object, ...]:
    if kind in (RowKind.END, RowKind.UNSUPPORTED):
        return (kind.name,)
    if kind in (RowKind.PLT, RowKind.CFA_DEREF_RBP):
        return ("EXPRESSION", rbp_offset)
    return (kind.name, cfa_offset, rbp_offset)


@pytest.mark.parametrize("path", [LIBC, LD_SO, "nofp_chain"])
def test_every_row_matches_readelf(path: str, tmp_path: Path) -> None:
    if path == "nofp_chain":
        path = str(build(tmp_path, "nofp_chain.c", NOFP))
    with open(path, "rb") as f:
        table = build_table(f, path)
    checked = 0
    for address, expected in _readelf_rules(path):
        rule = table.rule_at(address)
        got = _ours(RowKind(rule.kind), rule.cfa_offset, rule.rbp_offset)
        # An expression we do not implement is UNSUPPORTED on our side: also right.
        assert got == expected or (expected[0] == "EXPRESSION" and got == ("UNSUPPORTED",)), \
            f"{path} {address:#x}: readelf {expected}, ours {got}"
        checked += 1
    assert checked > (20_000 if path == LIBC else 10)
    kinds = {RowKind(r.kind) for r in table.rules}
    assert RowKind.CFA_RSP in kinds and RowKind.NONE in kinds  # gaps between FDEs are explicit


def test_libc_has_the_outermost_frame_and_plt() -> None:
    with open(LIBC, "rb") as f:
        table = build_table(f, LIBC)
    kinds = [RowKind(r.kind) for r in table.rules]
    assert RowKind.END in kinds  # _start/clone: return address undefined, the walk ends cleanly
    assert RowKind.PLT in kinds
    assert table.bpf_len() == len(table.bpf_image(0)) // ROW.size


@pytest.mark.parametrize("path", [LIBC, "/usr/bin/python3.11"])
def test_bucketed_bpf_search_finds_the_same_rules(path: str) -> None:
    """The BPF image's bucket index + bounded search (mirrored in Python) agree with a plain
    bisect at every row boundary, just before it, and at spread-out addresses."""
    with open(path, "rb") as f:
        table = build_table(f, path)
    first = 1000
    image = table.bpf_image(first)
    shift, buckets = table.bucket_shift(), table.bucket_count()
    assert 7 <= shift <= 16
    span = table.pcs[-1] - table.base
    probes = {pc - table.base + d for pc in table.pcs for d in (-1, 0, 1)} | set(range(0, span + 5000, 97))
    for pc in sorted(p for p in probes if p >= 0):
        want = table.rule_at(table.base + pc)
        got = bpf_row_lookup(image, first, buckets, shift, pc) or (RowKind.NONE, 0, 0)  # None: no row, NONE
        assert got == (want.kind, want.cfa_offset, want.rbp_offset), (hex(pc), got, want)


def test_oversized_tables_are_refused_before_parsing() -> None:
    with open(LIBC, "rb") as f, pytest.raises(TableTooLarge):
        build_table(f, LIBC, max_rows=1000)


def test_vdso_table_from_our_own_image() -> None:
    table = build_vdso_table()
    assert table is not None and len(table) > 5


def test_synthetic_cfi_expressions_and_state_stack() -> None:
    """PLT and stack-realignment expressions, remember/restore_state, the outermost frame."""
    cie = bytes([1]) + b"zR\0" + bytes([1, 0x78, 16, 1, 0x1B]) + bytes([0x0C, 7, 8, 0x90, 1])
    cie_entry = struct.pack("<II", 4 + len(cie), 0) + cie
    plt = bytes([0x0F, 11, 0x77, 0x08, 0x80, 0x00, 0x3F, 0x1A, 0x3B, 0x2A, 0x33, 0x24, 0x22])
    program = (
        bytes([0x41, 0x0E, 16, 0x86, 2])            # +1: CFA rsp+16, rbp at CFA-16
        + bytes([0x41, 0x0A, 0x0F, 3, 0x76, 0x78, 0x06])  # +1: remember; CFA = *(rbp-8)
        + bytes([0x41, 0x0B])                        # +1: restore_state
        + bytes([0x41]) + plt                         # +1: PLT expression (lit11)
        + bytes([0x41, 0x07, 16])                    # +1: return address undefined
    )
    data = bytearray(cie_entry)

    def fde(body: bytes, pc: int, size: int) -> bytes:
        start = len(data)
        pointer = start + 4
        pc_rel = pc - (start + 8)  # pcrel|sdata4 relative to the pc_begin field
        payload = struct.pack("<Iii", pointer, pc_rel, size) + bytes([0]) + body
        return struct.pack("<I", len(payload)) + payload

    data += fde(program, 0x1000, 0x100)
    fdes = parse_cfi(bytes(data), 0)
    pcs, rules = merge_fdes(fdes)
    got = {pc: (RowKind(r.kind), r.cfa_offset, r.rbp_offset) for pc, r in zip(pcs, rules, strict=True)}
    assert got[0x1000] == (RowKind.CFA_RSP, 8, 0)
    assert got[0x1001] == (RowKind.CFA_RSP, 16, -16)
    assert got[0x1002] == (RowKind.CFA_DEREF_RBP, -8, -16)
    assert got[0x1003] == (RowKind.CFA_RSP, 16, -16)
    assert got[0x1004] == (RowKind.PLT, 11, -16)
    assert got[0x1005] == (RowKind.END, 0, 0)
    assert got[0x1100] == (RowKind.NONE, 0, 0)


# -- walking real processes ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long
_PTRACE_GETREGS, _PTRACE_DETACH, _PTRACE_SEIZE, _PTRACE_INTERRUPT = 12, 17, 0x4206, 0x4207
_WALL = 0x40000000


class _UserRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi",
        "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


def snapshot(tid: int) -> tuple[int, int, int, StackCopy]:
    """Stop ``tid`` (ptrace), return ip, sp, bp and a copy of its stack up to the mapping's end."""
    if _libc.ptrace(_PTRACE_SEIZE, tid, None, None) != 0:
        raise OSError(ctypes.get_errno(), "PTRACE_SEIZE")
    try:
        _libc.ptrace(_PTRACE_INTERRUPT, tid, None, None)
        os.waitpid(tid, _WALL)
        regs = _UserRegs()
        if _libc.ptrace(_PTRACE_GETREGS, tid, None, ctypes.byref(regs)) != 0:
            raise OSError(ctypes.get_errno(), "PTRACE_GETREGS")
        with open(f"/proc/{tid}/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= regs.rsp < hi:
                    break
        with open(f"/proc/{tid}/mem", "rb") as mem:
            mem.seek(regs.rsp)
            data = mem.read(hi - regs.rsp)
        return regs.rip, regs.rsp, regs.rbp, StackCopy(regs.rsp, data)
    finally:
        _libc.ptrace(_PTRACE_DETACH, tid, None, None)


class Running:
    """A workload running for the test's duration, waited for "ready"."""

    def __init__(self, exe: Path, seconds: float = 30) -> None:
        self.exe = exe
        self.proc = subprocess.Popen([str(exe), str(seconds)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().startswith("ready")
        time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Running, Path]]:
    source, flags = request.param
    exe = build(tmp_path, source, flags)
    r = Running(exe)
    yield r, exe
    r.stop()


def _walks(pid: int, count: int, cache: TableCache | None = None,
           without: str | None = None) -> list[tuple[list[int], str, list[str]]]:
    """``count`` snapshots of ``pid`` walked; ``without`` drops the table of files whose path contains it."""
    cache = cache or TableCache()
    sym = Symbolizer()
    out = []
    for _ in range(count):
        ip, sp, bp, stack = snapshot(pid)
        tables = process_tables(pid, cache)
        if without:
            paths = {e.start: e.path for e in read_maps(pid)}
            tables = [MappedTable(m.start, m.end, m.load_bias, None) if without in paths.get(m.start, "") else m
                      for m in tables]
        frames, end = unwind(ip, sp, bp, tables, stack)
        names = [f.function for f in sym.symbolize_user(pid, frames)]
        out.append((frames, end, names))
        time.sleep(0.01)
    return out


def _direct_call_target(pid: int, return_address: int) -> int | None:
    """Target of the ``call rel32`` ending right before ``return_address``, if that is one."""
    with open(f"/proc/{pid}/mem", "rb") as mem:
        mem.seek(return_address - 5)
        code = mem.read(5)
    if code[0] != 0xE8:
        return None
    return return_address + struct.unpack("<i", code[1:])[0]


def _contains(names: list[str], chain: list[str]) -> bool:
    return any(names[i : i + len(chain)] == chain for i in range(len(names)))


@pytest.mark.parametrize("running", [("nofp_chain.c", NOFP)], indirect=True)
def test_walks_a_program_without_frame_pointers(running: tuple[Running, Path]) -> None:
    r, _ = running
    pid = r.proc.pid
    walks = _walks(pid, 20)
    complete = [w for w in walks if w[1] == "complete" and _contains(w[2], CHAIN)]
    assert len(complete) >= 18, [(w[1], w[2]) for w in walks]
    for frames, _, names in complete:
        assert names[-1] == "_start", names
        # Each return address follows a call: where that call is direct, its target is the
        # start of the function one frame down. Independent of any CFI.
        sym = Symbolizer()
        leaf_at = names.index("hot_leaf")
        for depth in range(leaf_at + 1, leaf_at + len(CHAIN)):
            target = _direct_call_target(pid, frames[depth])
            assert target is not None
            callee = sym.symbolize_user(pid, [target])[0].function
            assert callee == names[depth - 1], (callee, names)
    # Frame pointers alone cannot do this: rbp holds no frame chain in this build.
    fp_only = _walks(pid, 5, without="/")
    assert not any(_contains(w[2], CHAIN) for w in fp_only), [w[2] for w in fp_only]


@pytest.mark.parametrize("running", [("nofp_chain.c", ("-O0", "-fno-omit-frame-pointer", "-g"))], indirect=True)
def test_same_frames_as_the_frame_pointer_chain(running: tuple[Running, Path]) -> None:
    """An FP build walked by CFI and by its frame-pointer chain: the same frames up to main."""
    r, _ = running
    pid = r.proc.pid
    cache = TableCache()
    same = 0
    for _ in range(10):
        ip, sp, bp, stack = snapshot(pid)
        tables = process_tables(pid, cache)
        cfi, _ = unwind(ip, sp, bp, tables, stack)
        fp, _ = unwind(ip, sp, bp, [MappedTable(m.start, m.end, 0, None) for m in tables], stack)
        names = [f.function for f in Symbolizer().symbolize_user(pid, cfi)]
        if "main" not in names or "hot_leaf" not in names:
            continue  # stopped inside clock_gettime's vDSO prologue: FP skips a frame there
        upto = names.index("main") + 1
        assert cfi[:upto] == fp[:upto], (names, cfi, fp)
        same += 1
        time.sleep(0.01)
    assert same >= 7


@pytest.mark.parametrize("running", [("nofp_chain.c", ("-O0", "-fno-omit-frame-pointer", "-g"))], indirect=True)
def test_mixed_stack_crosses_from_frame_pointers_into_cfi(running: tuple[Running, Path]) -> None:
    """No table for the program (FP walk), tables for libc (CFI): the walk crosses both."""
    r, exe = running
    walks = _walks(r.proc.pid, 10, without=exe.name)
    ok = [w for w in walks if _contains(w[2], CHAIN) and w[2][-1] == "_start" and w[1] == "complete"]
    assert len(ok) >= 8, [(w[1], w[2]) for w in walks]


@pytest.mark.parametrize("running", [("qsort_callback.c", NOFP)], indirect=True)
def test_callback_called_by_libc_reaches_main(running: tuple[Running, Path]) -> None:
    r, _ = running
    pid = r.proc.pid
    libc_start = min(e.start for e in read_maps(pid) if "libc.so" in e.path)
    libc_end = max(e.end for e in read_maps(pid) if "libc.so" in e.path)
    walks = [w for w in _walks(pid, 30) if w[2] and w[2][0] == "compare_slow"]
    assert len(walks) >= 10
    for frames, end, names in walks:
        in_libc = [libc_start <= a < libc_end for a in frames]
        assert any(in_libc[1:]), names
        first_libc = in_libc.index(True, 1)
        beyond = names[first_libc:]
        assert "sort_rounds" in beyond and "main" in beyond and end == "complete", names


# -- the loader's bookkeeping, against a fake of the BPF maps -------------------------------------

class FakeMaps:
    def __init__(self) -> None:
        self.rows: dict[int, bytes] = {}
        self.procs: dict[int, bytes] = {}
        self.requests: list[tuple[int, int]] = []
        self.closed = False

    def write_rows(self, start: int, packed: bytes) -> None:
        for i in range(len(packed) // ROW.size):
            self.rows[start + i] = packed[i * ROW.size : (i + 1) * ROW.size]

    def write_process(self, pid: int, entry: bytes) -> None:
        assert len(entry) == PROC_SIZE
        self.procs[pid] = entry

    def delete_process(self, pid: int) -> None:
        self.procs.pop(pid, None)

    def take_requests(self) -> list[tuple[int, int]]:
        out, self.requests = self.requests, []
        return out

    def has_requests(self) -> bool:
        return bool(self.requests)

    def read_counters(self) -> list[int]:
        return [0] * 9

    def close(self) -> None:
        self.closed = True


def test_row_allocator_first_fit_and_coalescing() -> None:
    a = RowAllocator(100)
    x, y, z = a.alloc(30), a.alloc(30), a.alloc(30)
    assert (x, y, z) == (0, 30, 60) and a.alloc(20) is None
    a.free(30, 30)
    a.free(0, 30)
    assert a.alloc(60) == 0 and a.free_rows == 10


def test_process_entry_layout() -> None:
    entry = encode_process([(0x1000, 0x2000, 0x1000, 5, 7, 12, 0)])
    assert len(entry) == PROC_SIZE == 8 + 256 * 40
    assert struct.unpack_from("<II", entry) == (1, 0)
    assert struct.unpack_from("<QQQIIII", entry, 8) == (0x1000, 0x2000, 0x1000, 5, 7, 12, 0)


def _mappings(entry: bytes) -> list[tuple[int, ...]]:
    count, _ = struct.unpack_from("<II", entry)
    return [struct.unpack_from("<QQQIIII", entry, 8 + 40 * i) for i in range(count)]


def _new(unwinder: NativeUnwinder, maps: FakeMaps, *pids: int) -> None:
    """What BPF does at a process's first sample."""
    maps.requests = [(pid, encode_request(REQUEST_NEW)) for pid in pids]
    unwinder.serve_requests()


def _land_everywhere(unwinder: NativeUnwinder, maps: FakeMaps, pid: int) -> None:
    """What BPF does as samples land in each pending mapping: ask for its table."""
    for m in _mappings(maps.procs[pid]):
        if m[6] & MAPPING_PENDING:  # BPF keeps one request per pid: they come one at a time
            maps.requests = [(pid, encode_request(REQUEST_TABLE, m[0] + 1))]
            unwinder.serve_requests()


@contextlib.contextmanager
def _first_sample_of_nofp_chain(
        tmp_path: Path) -> Iterator[tuple[NativeUnwinder, FakeMaps, Running, list[tuple[int, ...]]]]:
    """nofp_chain running, an unwinder over fake BPF maps, and the process loaded as at its
    first sample: (unwinder, maps, the process, the mappings written for it)."""
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    unwinder = NativeUnwinder(maps, Counters(), max_rows=400_000)
    r = Running(exe)
    try:
        _new(unwinder, maps, r.proc.pid)
        yield unwinder, maps, r, _mappings(maps.procs[r.proc.pid])
    finally:
        r.stop()


def test_tables_are_built_only_for_mappings_samples_land_in(tmp_path: Path) -> None:
    with _first_sample_of_nofp_chain(tmp_path) as (unwinder, maps, r, mappings):
        assert [m[0] for m in mappings] == sorted(m[0] for m in mappings)
        program = next(e for e in read_maps(r.proc.pid) if e.path == str(r.exe))
        libc = next(e for e in read_maps(r.proc.pid) if "libc.so" in e.path)
        pending = {m[0] for m in mappings if m[6] & MAPPING_PENDING}
        assert not maps.rows and {program.start, libc.start} <= pending
        maps.requests = [(r.proc.pid, encode_request(REQUEST_TABLE, program.start + 16))]
        unwinder.serve_requests()
        after = {m[0]: m for m in _mappings(maps.procs[r.proc.pid])}
        assert after[program.start][4] > 0 and after[program.start][6] == 0  # the program has its table
        assert sum(1 for m in after.values() if m[4]) == 1  # and nothing else was built
        assert unwinder.tables.built == 1


def test_bpf_mapping_search_finds_every_mapping_the_loader_writes(tmp_path: Path) -> None:
    """Every pc of every mapping written for a real process is found by BPF's branch-free
    search (mirrored step for step): [vsyscall], above 2^63, once drew the search onto itself
    and left the mapping before it (the dynamic loader) unknown to the walk."""
    with _first_sample_of_nofp_chain(tmp_path) as (_unwinder, _maps, r, mappings):
        assert any(LD_SO.split("/")[-1] in e.path for e in read_maps(r.proc.pid))
        assert "[vsyscall]" in Path(f"/proc/{r.proc.pid}/maps").read_text()
        missed = [(hex(m[0]), hex(ip)) for i, m in enumerate(mappings) for ip in (m[0], (m[0] + m[1]) // 2, m[1] - 1)
                  if bpf_mapping_lookup(mappings, ip) != i]
        assert len(mappings) >= 3 and not missed, missed


def test_a_preloaded_process_has_its_executables_table_before_any_request(tmp_path: Path) -> None:
    """A process selected for wall/lock/heap is loaded, with its executable's table, before BPF
    asks for anything: its first traced events are walked with it (docs/design/wall-and-lock.md,
    "Stacks before the tables"). Other files stay pending until samples land in them."""
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    counters = Counters()
    unwinder = NativeUnwinder(maps, counters, max_rows=400_000)
    r = Running(exe)
    try:
        unwinder.preload({r.proc.pid})
        assert not maps.procs  # served by the worker, not by the caller's thread
        unwinder.serve_requests()
        program = next(e for e in read_maps(r.proc.pid) if e.path == str(exe))
        after = {m[0]: m for m in _mappings(maps.procs[r.proc.pid])}
        assert after[program.start][4] > 0 and after[program.start][6] == 0
        assert sum(1 for m in after.values() if m[4]) == 1 and unwinder.tables.built == 1
        assert counters.get("unwind_preloads", result="loaded") == 1
        unwinder.preload({r.proc.pid})  # every actor with a selector asks: handled once
        unwinder.serve_requests()
        assert counters.get("unwind_preloads") == 1 and unwinder.tables.built == 1
        # Loaded by a first sample (its executable pending: no sample landed there yet), then
        # selected: the executable's table is built and attached.
        maps, counters = FakeMaps(), Counters()
        unwinder = NativeUnwinder(maps, counters, max_rows=400_000)
        _new(unwinder, maps, r.proc.pid)
        assert {m[0]: m for m in _mappings(maps.procs[r.proc.pid])}[program.start][6] & MAPPING_PENDING
        unwinder.preload({r.proc.pid})
        unwinder.serve_requests()
        assert counters.get("unwind_preloads", result="known") == 1
        assert {m[0]: m for m in _mappings(maps.procs[r.proc.pid])}[program.start][4] > 0
    finally:
        r.stop()


def test_a_process_that_execs_after_its_load_is_reloaded_at_once(tmp_path: Path) -> None:
    """Selected and loaded as a launcher script, a process execs its program: its first
    unknown address has it reloaded, whatever the reload rate limit (the stale mappings would
    have its stacks walked by frame pointers until then)."""
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    unwinder = NativeUnwinder(maps, Counters(), max_rows=400_000, reload_after_s=3600.0)
    proc = subprocess.Popen(["/bin/sh", "-c", f"read go; exec {exe} 30"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        unwinder.preload({proc.pid})
        unwinder.serve_requests()
        assert maps.procs[proc.pid]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("ready")
        program = next(e for e in read_maps(proc.pid) if e.path == str(exe))
        assert program.start not in {m[0] for m in _mappings(maps.procs[proc.pid])}
        maps.requests = [(proc.pid, encode_request(REQUEST_UNKNOWN_ADDRESS, program.start + 16))]
        unwinder.serve_requests()
        assert program.start in {m[0] for m in _mappings(maps.procs[proc.pid])}
    finally:
        proc.kill()
        proc.wait(5)


def test_table_building_is_held_to_its_cpu_budget(tmp_path: Path) -> None:
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    counters = Counters()
    unwinder = NativeUnwinder(maps, counters, max_rows=400_000, table_cpu_share=0.0, table_cpu_burst_s=0.0)
    r = Running(exe)
    try:
        _new(unwinder, maps, r.proc.pid)
        program = next(e for e in read_maps(r.proc.pid) if e.path == str(exe))
        maps.requests = [(r.proc.pid, encode_request(REQUEST_TABLE, program.start + 16))]
        unwinder.serve_requests()
        assert counters.get("unwind_tables_deferred") == 1 and not maps.rows  # BPF will ask again
        unwinder.table_cpu_burst_s = unwinder._table_tokens_s = 1.0
        maps.requests = [(r.proc.pid, encode_request(REQUEST_TABLE, program.start + 16))]
        unwinder.serve_requests()
        assert maps.rows and unwinder._table_tokens_s < 1.0
    finally:
        r.stop()


def test_loader_registers_processes_shares_tables_and_sweeps_exits(tmp_path: Path) -> None:
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    unwinder = NativeUnwinder(maps, Counters(), max_rows=400_000)
    first, second = Running(exe), Running(exe)
    try:
        _new(unwinder, maps, first.proc.pid, second.proc.pid)
        assert set(maps.procs) == {first.proc.pid, second.proc.pid}
        _land_everywhere(unwinder, maps, first.proc.pid)
        rows_after_first = len(maps.rows)
        assert rows_after_first and any(m[4] for m in _mappings(maps.procs[first.proc.pid]))
        _land_everywhere(unwinder, maps, second.proc.pid)
        assert len(maps.rows) == rows_after_first  # the same files: rows written once
        third = Running(exe)
        _new(unwinder, maps, third.proc.pid)  # every file known: attached at once, nothing pending
        assert not any(m[6] & MAPPING_PENDING for m in _mappings(maps.procs[third.proc.pid]))
        assert len(maps.rows) == rows_after_first
        third.stop()
        unwinder.sweep()
        assert third.proc.pid not in maps.procs and first.proc.pid in maps.procs
    finally:
        first.stop()
        second.stop()
        unwinder.close()
    assert maps.closed


def test_evicted_tables_are_rebuilt_from_their_files(tmp_path: Path) -> None:
    """Rows of tables no live process uses are reclaimed when space runs out; a later
    process mapping that file gets its table read again (the agent keeps no second copy)."""
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    cache = TableCache()
    libstdcxx = "/lib/x86_64-linux-gnu/libstdc++.so.6"
    with open(LIBC, "rb") as f, open(libstdcxx, "rb") as g:
        libc_slots, other_slots = build_table(f, LIBC).bpf_len(), build_table(g, libstdcxx).bpf_len()
    maps = FakeMaps()
    counters = Counters()
    # Room for either libc or libstdc++ (plus the small tables), never both.
    unwinder = NativeUnwinder(maps, counters, max_rows=max(libc_slots, other_slots) + 5_000, tables=cache)
    first = Running(exe)
    _new(unwinder, maps, first.proc.pid)
    _land_everywhere(unwinder, maps, first.proc.pid)
    assert any("libc.so" in r.table.name for r in unwinder._resident.values())
    first.stop()
    unwinder.sweep()  # libc's rows now unused
    with open(libstdcxx, "rb") as f:
        assert unwinder._upload(build_table(f, libstdcxx)) is not None  # needs libc's space: evicts it
    assert not any("libc.so" in r.table.name for r in unwinder._resident.values())
    second = Running(exe)
    try:
        _new(unwinder, maps, second.proc.pid)
        assert any("libc.so" in r.table.name for r in unwinder._resident.values())
        assert counters.get("unwind_processes", result="loaded") == 2
    finally:
        second.stop()


def test_loader_gives_up_cleanly_on_vanished_processes() -> None:
    maps = FakeMaps()
    counters = Counters()
    unwinder = NativeUnwinder(maps, counters, max_rows=100_000)
    _new(unwinder, maps, 2**22 - 1)
    assert not maps.procs and counters.get("unwind_processes", result="gone") == 1


def test_tables_exceeding_capacity_fall_back_and_are_counted(tmp_path: Path) -> None:
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    counters = Counters()
    unwinder = NativeUnwinder(maps, counters, max_rows=5_000)  # libc (~28k rows) cannot fit
    r = Running(exe)
    try:
        _new(unwinder, maps, r.proc.pid)
        _land_everywhere(unwinder, maps, r.proc.pid)
        mappings = _mappings(maps.procs[r.proc.pid])
        assert any(m[4] for m in mappings)  # the program's own table fits
        assert not any(m[6] & MAPPING_PENDING for m in mappings)  # libc: settled as "no table"
    finally:
        r.stop()
    assert unwinder.tables.too_large >= 1


def test_readelf_available() -> None:
    assert shutil.which("readelf"), "binutils' readelf is the independent ground truth for CFI"


def test_second_process_of_a_binary_reuses_file_identities_and_still_gets_tables(tmp_path: Path) -> None:
    """Files seen in one process's maps are not stat'ed again for the next process of the same
    binary, and the second process's table requests open its own mappings."""
    exe = build(tmp_path, "nofp_chain.c", NOFP)
    maps = FakeMaps()
    unwinder = NativeUnwinder(maps, Counters(), max_rows=400_000)
    first, second = Running(exe), Running(exe)
    try:
        _new(unwinder, maps, first.proc.pid)
        known = len(unwinder._file_keys)
        assert known >= 2  # the program and libc at least
        _new(unwinder, maps, second.proc.pid)
        assert len(unwinder._file_keys) == known  # nothing new to stat
        program = next(e for e in read_maps(second.proc.pid) if e.path == str(exe))
        maps.requests = [(second.proc.pid, encode_request(REQUEST_TABLE, program.start + 16))]
        unwinder.serve_requests()
        after = {m[0]: m for m in _mappings(maps.procs[second.proc.pid])}
        assert after[program.start][4] > 0  # built from the second process's mapping
    finally:
        first.stop()
        second.stop()


class RoundCountingMaps(FakeMaps):
    """FakeMaps recording, at each round of the worker, how many requests waited."""

    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[int] = []
        self.first_round = threading.Event()

    def take_requests(self) -> list[tuple[int, int]]:
        self.rounds.append(len(self.requests))
        self.first_round.set()
        return super().take_requests()


def _idle_worker(maps: RoundCountingMaps) -> NativeUnwinder:
    """A started worker past its first round, polling only every hour from then on."""
    unwinder = NativeUnwinder(maps, Counters(), max_rows=400_000, poll_interval_s=3600.0,
                              idle_poll_interval_s=3600.0)
    unwinder.start()
    assert maps.first_round.wait(60)
    return unwinder


def _wait_until_served(maps: FakeMaps, pid: int, why: str) -> None:
    deadline = time.monotonic() + 60
    while pid not in maps.procs:
        assert time.monotonic() < deadline, why
        time.sleep(0.01)


def test_an_idle_worker_serves_a_request_as_soon_as_it_is_nudged() -> None:
    """The worker polls an idle request map only every IDLE_POLL_INTERVAL_S (here an hour):
    a nudge (the CPU profile's poll thread saw a new stack) makes it serve the request now."""
    maps = RoundCountingMaps()
    unwinder = _idle_worker(maps)
    try:
        maps.requests = [(os.getpid(), encode_request(REQUEST_NEW))]
        unwinder.nudge()
        _wait_until_served(maps, os.getpid(), "the nudged worker did not serve the request")
    finally:
        unwinder.close()
    assert maps.closed and unwinder.failure is None


def test_a_flush_wakes_an_idle_worker_only_when_a_request_waits() -> None:
    """``nudge_if_requested`` (each actor's flush) wakes an idle worker for a request that no
    record announced (the wall and lock programs'), and costs no wake-up when none waits."""
    maps = RoundCountingMaps()
    unwinder = _idle_worker(maps)
    try:
        unwinder.nudge_if_requested()  # nothing waits: no round
        time.sleep(0.5)
        assert maps.rounds == [0]
        maps.requests = [(os.getpid(), encode_request(REQUEST_NEW))]
        unwinder.nudge_if_requested()
        _wait_until_served(maps, os.getpid(), "the worker was not woken for the waiting request")
        assert maps.rounds == [0, 1]
    finally:
        unwinder.close()
    unwinder.nudge_if_requested()  # after close: nothing happens, nothing raises
    assert maps.closed and unwinder.failure is None
