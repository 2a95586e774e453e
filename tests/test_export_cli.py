"""`stackfleet export`: stored OTLP exports merged into one pprof that Google pprof reads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)

from aggregator.exporters.files import LocalFileWriter
from aggregator.otlp.checks import check_request
from aggregator.otlp.decode import merge_request
from aggregator.otlp.encode import encode_request
from aggregator.profile import FleetProfiles
from shared.profile_types import ProfileType
from tests.test_otlp import fleet

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
STACKFLEET = str(Path(sys.executable).parent / "stackfleet")


def test_decode_is_the_inverse_of_encode() -> None:
    original = fleet()
    decoded = FleetProfiles(0, 0)
    merge_request(decoded, encode_request(original), ProfileType.LOCK)
    (lock,) = decoded.hosts.values()
    (sample,) = lock.samples.values()
    assert sample.values == [3, 1_500] and sample.frames[0].function == "wait"
    merge_request(decoded, encode_request(original), ProfileType.CPU)
    cpu = decoded.hosts[("web-1", ProfileType.CPU)]
    assert sum(s.values[0] for s in cpu.samples.values()) == 3 * 10_101_010


def test_export_command_merges_files_into_pprof(tmp_path: Path) -> None:
    writer = LocalFileWriter(tmp_path / "profiles")
    f = fleet()
    for i in range(3):
        f.end_ns = 10_000_000_000 + i
        writer.write(f, encode_request(f))
    out = tmp_path / "out.pb.gz"
    result = subprocess.run([STACKFLEET, "export", "--type", "cpu", "--since", "10m", "-o", str(out),
                             "--dir", str(tmp_path / "profiles")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "3 exports" in result.stderr + result.stdout
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    top = subprocess.run([str(PPROF), "-top", "-unit=ns", str(out)], capture_output=True, text=True, check=True).stdout
    assert "leaf" in top
    # 3 exports x 2 hosts x 3 samples of 10,101,010 ns
    assert "181818180ns" in top.replace(",", "") or "0.18s" in top, top


def test_export_without_files_says_what_to_do(tmp_path: Path) -> None:
    result = subprocess.run([STACKFLEET, "export", "--dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 1 and "no exports" in result.stderr + result.stdout


def other_producer_request() -> ExportProfilesServiceRequest:
    """A CPU request in the OpenTelemetry eBPF profiler's shape, built by hand: resource per
    process, counted samples with timestamps only, a location with an inlined call (two lines),
    JVM frames, an unsymbolized native frame (no line) with its build ids."""
    req = ExportProfilesServiceRequest()
    d = req.dictionary
    strings = ["", "samples", "count", "cpu", "nanoseconds", "com.example.Cart.total", "Cart.java",
               "com.example.Main.main", "Main.java", "inlinedHelper", "caller", "/usr/lib/jvm/libjvm.so",
               "profile.frame.type", "process.executable.build_id.gnu", "process.executable.build_id.htlhash",
               "thread.name", "thread.id", "cpu.logical_number", "helper.c"]
    d.string_table.extend(strings)
    s = {v: i for i, v in enumerate(strings)}
    for table in (d.mapping_table, d.location_table, d.function_table, d.link_table, d.attribute_table, d.stack_table):
        table.add()

    def attr(key: str, value: str | int) -> int:
        kv = d.attribute_table.add(key_strindex=s[key])
        if isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = value
        return len(d.attribute_table) - 1

    jvm, native = attr("profile.frame.type", "jvm"), attr("profile.frame.type", "native")
    d.mapping_table.add(memory_start=0x7F0000000000, memory_limit=0x7F0000100000, filename_strindex=s[
        "/usr/lib/jvm/libjvm.so"], attribute_indices=[attr("process.executable.build_id.gnu", "aa" * 20),
                                                      attr("process.executable.build_id.htlhash", "bb" * 16)])
    d.mapping_table.add(attribute_indices=[attr("process.executable.build_id.htlhash", "cc" * 16)])  # JVM code
    for name, file in (("com.example.Cart.total", "Cart.java"), ("com.example.Main.main", "Main.java"),
                       ("inlinedHelper", "helper.c"), ("caller", "helper.c")):
        d.function_table.add(name_strindex=s[name], filename_strindex=s[file])
    d.location_table.add(mapping_index=2, address=0, attribute_indices=[jvm], lines=[{"function_index": 1, "line": 42}])
    d.location_table.add(mapping_index=2, address=0, attribute_indices=[jvm], lines=[{"function_index": 2, "line": 7}])
    d.location_table.add(mapping_index=1, address=0x7F0000001234, attribute_indices=[native],
                         lines=[{"function_index": 3, "line": 10}, {"function_index": 4, "line": 20}])
    d.location_table.add(mapping_index=1, address=0x7F0000005678, attribute_indices=[native])  # unsymbolized
    d.stack_table.add(location_indices=[3, 4, 1, 2])
    rp = req.resource_profiles.add()
    for key, value in (("service.name", "cart"), ("process.pid", 4242), ("process.executable.name", "java"),
                       ("container.id", "c" * 64), ("host.name", "jvm-host")):
        kv = rp.resource.attributes.add(key=key)
        if isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = value
    sp = rp.scope_profiles.add()
    sp.scope.name, sp.scope.version = "otel-ebpf-profiler", "v0.0.0"
    prof = sp.profiles.add(period=50_000_000, time_unix_nano=1_000_000_000, duration_nano=5_000_000_000)
    prof.sample_type.type_strindex, prof.sample_type.unit_strindex = s["samples"], s["count"]
    prof.period_type.type_strindex, prof.period_type.unit_strindex = s["cpu"], s["nanoseconds"]
    prof.samples.add(stack_index=1, timestamps_unix_nano=[1_100_000_000, 1_200_000_000, 1_300_000_000],
                     attribute_indices=[attr("thread.name", "http-1"), attr("thread.id", 4243),
                                        attr("cpu.logical_number", 1)])
    return req


def test_another_producers_request_is_read_and_written_again(tmp_path: Path) -> None:
    req = other_producer_request()
    assert check_request(req) == []
    decoded = FleetProfiles(0, 0)
    assert merge_request(decoded, req, ProfileType.CPU) == 1
    (sample,) = decoded.hosts[("jvm-host", ProfileType.CPU)].samples.values()
    assert sample.values == [3 * 50_000_000] and len(sample.timestamps_ns) == 3  # one sample per timestamp
    assert (sample.pid, sample.tid, sample.thread_name, sample.process_name) == (4242, 4243, "http-1", "java")
    assert dict(sample.attributes) == {"service.name": "cart", "container.id": "c" * 64}
    assert [(f.function, f.line, f.frame_type.value, f.inlined) for f in sample.frames] == [
        ("inlinedHelper", 10, "native", True), ("caller", 20, "native", False), ("", 0, "native", False),
        ("com.example.Cart.total", 42, "jvm", False), ("com.example.Main.main", 7, "jvm", False)]
    assert sample.frames[0].mapping is not None and sample.frames[0].mapping.build_id == "aa" * 20
    assert sample.frames[0].mapping.htlhash == "bb" * 16
    again = encode_request(decoded)
    assert check_request(again) == []
    back = FleetProfiles(0, 0)
    merge_request(back, again, ProfileType.CPU)
    (resample,) = back.hosts[("jvm-host", ProfileType.CPU)].samples.values()
    assert resample.frames == sample.frames and resample.values == sample.values
    # and `stackfleet export` turns it into a pprof that Google pprof reads
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "20260101T000000-000000000.otlp.pb").write_bytes(req.SerializeToString())
    out = tmp_path / "out.pb.gz"
    result = subprocess.run([STACKFLEET, "export", "--type", "cpu", "--since", "10m", "-o", str(out),
                             "--dir", str(tmp_path / "p")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    traces = subprocess.run([str(PPROF), "-traces", str(out)], capture_output=True, text=True, check=True).stdout
    # a request referring to entries it does not have is skipped whole, with the reason
    broken = other_producer_request()
    broken.dictionary.stack_table[1].location_indices.append(99)
    (tmp_path / "p" / "20260101T000001-000000000.otlp.pb").write_bytes(broken.SerializeToString())
    result = subprocess.run([STACKFLEET, "export", "--type", "cpu", "--since", "10m", "-o", str(out),
                             "--dir", str(tmp_path / "p")], capture_output=True, text=True)
    assert result.returncode == 0 and "index_out_of_range" in result.stdout + result.stderr, result
    # 3 samples x 50 ms; the inlined call marked as such by pprof, the unknown frame by module
    # and file offset (0x7f0000005678 in a mapping that starts at 0x7f0000000000, offset 0)
    assert re.search(r"150ms\s+inlinedHelper \(inline\)\s+caller\s+libjvm\.so\+0x5678\s+"
                     r"com\.example\.Cart\.total\s+com\.example\.Main\.main", traces), traces
