"""The web page in a real headless Chromium, fed by a real agent and aggregator.

A real agent profiles cpu_chain (two threads spinning in hot_leaf, reached through
main -> run_thread -> outer -> middle -> hot_leaf) with CPU and wall profiles; the
aggregator writes its exports and serves the page. Debian's chromium, driven by
selenium through chromedriver, must show hot_leaf in the flame graph, highlight it on
search, show its total/self in a tooltip, zoom on click and switch to the wall profile;
the page's CPU and wall totals for the workload's process must equal what the aggregator
exported for it, and the pprof behind the page's download link must have hot_leaf on top
for Google's pprof.
The top table must list hot_leaf first, sort, and focus the graph on a click; a drag on the
timeline must narrow the range to the API's total for it. A second test serves synthetic
exports of 1,000 hosts: the host picker searches them, and the table's and the timeline's
numbers are the known sums. Screenshots go to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from integration.harness import PipelineRun, build_c, run_pipeline
from shared.profile_types import ProfileType
from stackfleet.nats_server import NatsServer, free_port

PPROF = Path(__file__).resolve().parents[1] / ".tools" / "pprof"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HIGHLIGHT = "#E600E6"  # d3-flame-graph's fill for search matches
T = TypeVar("T")
# Generous: a run beside an hour-long soak saw the first views take ~35 s each.
WAIT_S = float(os.environ.get("STACKFLEET_TEST_PAGE_WAIT_S", 120))


def frame_css(name: str) -> str:
    return f'g.frame[name="{name}"]'


def widest(driver: Any, name: str) -> Any:
    """The largest rect of the frames called ``name`` (a function can appear under several callers)."""
    from selenium.webdriver.common.by import By

    rects = driver.find_elements(By.CSS_SELECTOR, frame_css(name) + " rect")
    return max(rects, key=lambda r: float(r.get_attribute("width") or 0))


def frames_and_fills(driver: Any) -> list[tuple[str, str]]:
    """Every drawn frame's name and fill, read in one script so a re-render cannot interleave."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('g.frame')).map(g => {"
        " const r = g.querySelector('rect'); return [g.getAttribute('name'), r ? r.getAttribute('fill') : ''];"
        " });")
    return [(str(name), str(fill or "")) for name, fill in rows]


def again_if_redrawn(step: Callable[[], T], attempts: int = 5) -> T:
    """Run a step that touches elements, again if the page redrew one of them under it.

    The page redraws the chart when its data or search changes; an element found just
    before a redraw is stale when read. Redrawn elements are found afresh on each attempt.
    """
    from selenium.common.exceptions import StaleElementReferenceException

    for attempt in range(attempts):
        try:
            return step()
        except StaleElementReferenceException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, shown on failure
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def status_total(driver: Any) -> int:
    return int(driver.find_element("id", "status").get_attribute("data-total") or -1)


def table(driver: Any) -> list[tuple[str, int, int]]:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#top tbody tr')).map(r => "
        "[r.dataset.name, Number(r.dataset.self), Number(r.dataset.total)]);")
    return [(str(n), int(s), int(t)) for n, s, t in rows]


def timeline_bars(driver: Any) -> list[tuple[float, float, int, float]]:
    """The timeline's bars: x and width in pixels, the value each stands for, height in pixels."""
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#timeline .bars rect')).map(r => "
        "[Number(r.getAttribute('x')), Number(r.getAttribute('width')), Number(r.dataset.value), "
        "Number(r.getAttribute('height'))]);")
    return [(float(x), float(w), int(v), float(h)) for x, w, v, h in rows]


def drag_on_timeline(driver: Any, from_fraction: float, to_fraction: float) -> None:
    """Press at one fraction of the timeline's width, release at another (selenium offsets are from the centre)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    overlay = driver.find_element(By.CSS_SELECTOR, "#timeline .brush .overlay")
    width = float(overlay.get_attribute("width"))
    start = (from_fraction - 0.5) * width
    ActionChains(driver).move_to_element_with_offset(overlay, int(start), 0).click_and_hold() \
        .move_by_offset(int((to_fraction - from_fraction) * width), 0).release().perform()


def drive_page(base: str, shots: Path, workload_s: tuple[float, float]) -> dict[str, Any]:
    """Everything a person would do on the page; blocking (runs in a thread, off the server's loop).

    ``workload_s`` is when the workload ran (unix seconds): the timeline's range starts before it.
    """
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    seen: dict[str, Any] = {}
    driver = browser()
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    try:
        driver.get(base + "/?type=cpu&since=15m")
        # the service picker's list is filled from the data: type the workload's executable
        wait.until(lambda d: "cpu_chain" in [o.get_attribute("value") for o in
                                             d.find_elements(By.CSS_SELECTOR, "#service-options option")])
        driver.find_element(By.ID, "service").send_keys("cpu_chain", Keys.ENTER)
        wait.until(lambda d: "service=cpu_chain" in d.current_url)  # the filtered view is drawn
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, frame_css("hot_leaf"))))
        seen["status"] = driver.find_element(By.ID, "status").text
        seen["frames"] = {name for name, _ in frames_and_fills(driver)}

        # The top table: by self, the hot function first; sorting by total and back; a click focuses.
        seen["top_by_self"] = table(driver)
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="total"]').click()
        seen["top_by_total"] = table(driver)
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="total"]').click()
        seen["top_by_total_ascending"] = table(driver)
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="self"]').click()
        svg_width = float(driver.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("width"))
        again_if_redrawn(lambda: driver.find_element(By.CSS_SELECTOR, '#top tr[data-name="hot_leaf"]').click())
        wait.until(lambda d: float(widest(d, "hot_leaf").get_attribute("width")) / svg_width > 0.95)
        seen["focused_fill"] = again_if_redrawn(lambda: widest(driver, "hot_leaf").get_attribute("fill"))
        shot = shots / "top-table-focused.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        driver.find_element(By.ID, "reset-zoom").click()

        driver.find_element(By.ID, "search").send_keys("hot_le")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, frame_css("hot_leaf") + " rect")
                   .get_attribute("fill").upper() == HIGHLIGHT)
        seen["highlighted"] = {name for name, fill in frames_and_fills(driver) if fill.upper() == HIGHLIGHT}
        seen["search_details"] = driver.find_element(By.ID, "details").text

        again_if_redrawn(lambda: ActionChains(driver).move_to_element(widest(driver, "hot_leaf")).perform())
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".d3-flame-graph-tip")))
        seen["tooltip"] = again_if_redrawn(lambda: driver.find_element(By.CSS_SELECTOR, ".d3-flame-graph-tip").text)
        width = again_if_redrawn(
            lambda: float(driver.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("width")))
        again_if_redrawn(lambda: ActionChains(driver).move_to_element(widest(driver, "middle")).click().perform())
        wait.until(lambda d: float(widest(d, "middle").get_attribute("width")) / width > 0.95)
        seen["root_after_zoom"] = again_if_redrawn(
            lambda: float(driver.find_element(By.CSS_SELECTOR, frame_css("all") + " rect").get_attribute("width"))
        ) / width
        shot = shots / "flamegraph-cpu.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        seen["pprof_url"] = driver.find_element(By.ID, "download-pprof").get_attribute("href")

        Select(driver.find_element(By.ID, "type")).select_by_value("wall")
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("wall"))
        seen["wall_status"] = driver.find_element(By.ID, "status").text
        seen["wall_frames"] = {name for name, _ in frames_and_fills(driver)}
        seen["wall_url"] = driver.current_url
        shot = shots / "flamegraph-wall.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")

        # The timeline of a shared link's absolute range around the workload: a drag over the first
        # half of the exports that hold cpu_chain's samples (on a loaded machine they may be exported
        # well after the workload ran) selects them, and the graph's and the table's totals follow.
        driver.get(f"{base}/?type=cpu&service=cpu_chain&since={workload_s[0] - 5:.0f}&until={time.time() + 2:.0f}")
        wait.until(lambda d: status_total(d) > 0 and d.find_elements(By.CSS_SELECTOR, "#timeline .brush .overlay")
                   and "hot_leaf" in [row[0] for row in table(d)])
        seen["range_total"] = status_total(driver)
        seen["range_hot_leaf"] = next(row for row in table(driver) if row[0] == "hot_leaf")
        bars = [bar for bar in timeline_bars(driver) if bar[2] > 0]
        assert len(bars) >= 2, f"cpu_chain's samples in fewer than two exports: {bars}"
        # CPU time adds up over a bar's span: its height is the value per pixel of width (a
        # wider bucket is wider, not taller), the same factor for every bar not widened to 1 px.
        factors = [h * w / v for _, w, v, h in bars if w > 2]
        assert factors and max(factors) <= 1.01 * min(factors), factors
        # From the middle of the first such bar to the middle of the one after the first half:
        # the exports ending inside (first half) count, the rest do not.
        width = float(driver.find_element(By.CSS_SELECTOR, "#timeline .brush .overlay").get_attribute("width"))
        after_half = bars[len(bars) // 2]
        drag_on_timeline(driver, (bars[0][0] + bars[0][1] / 2) / width, (after_half[0] + after_half[1] / 2) / width)
        wait.until(lambda d: "selected" in d.find_element(By.ID, "selection").text
                   and status_total(d) != seen["range_total"])
        seen["selected_total"] = status_total(driver)
        seen["selected_hot_leaf"] = next((row for row in table(driver) if row[0] == "hot_leaf"), None)
        seen["selected_url"] = driver.current_url
        wait.until(lambda d: float(widest(d, "hot_leaf").get_attribute("width") or 0) > 0)  # drawn, for the picture
        shot = shots / "timeline-selection.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    except Exception:
        driver.save_screenshot(str(shots / "failure.png"))
        print(f"failed at {seen.keys()}; status {driver.find_element(By.ID, 'status').text!r}; "
              f"screenshot: {shots / 'failure.png'}")
        print("browser console:", driver.get_log("browser"))
        for path in ("api/types?since=15m", "api/hosts?type=cpu&since=15m", "static/app.js"):
            started = time.monotonic()
            try:
                size = len(fetch(f"{base}/{path}"))
                print(f"server answers {path}: {size} bytes in {time.monotonic() - started:.1f} s")
            except OSError as exc:
                print(f"server does not answer {path}: {exc!r} after {time.monotonic() - started:.1f} s")
        raise
    finally:
        driver.quit()
    return seen


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=WAIT_S) as response:
        return bytes(response.read())


def has_frame(node: dict[str, Any], name: str) -> bool:
    return node["name"] == name or any(has_frame(c, name) for c in node["children"])


def wait_for_data(base: str, timeout_s: float = 120) -> None:
    """Until the API shows hot_leaf for cpu_chain and its total stopped growing.

    On a loaded machine the agent's last batches arrive seconds after the workload ends.
    """
    url = f"{base}/api/flamegraph?type=cpu&service=cpu_chain"
    deadline = time.monotonic() + timeout_s
    previous = -1
    while time.monotonic() < deadline:
        view = json.loads(fetch(url))
        if has_frame(view["tree"], "hot_leaf") and view["total"] == previous:
            return
        previous = view["total"]
        time.sleep(3)
    raise TimeoutError(f"no stable cpu_chain profile with hot_leaf within {timeout_s}s (last total {previous})")


def pprof_top_function(path: Path) -> str:
    out = subprocess.run([str(PPROF), "-top", "-nodecount=5", str(path)], capture_output=True, text=True,
                         check=True).stdout
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("flat"))
    return lines[header + 1].split()[-1]


def test_web_page_shows_the_hot_function(tmp_path: Path) -> None:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(tool):
            pytest.fail(f"{tool} missing: scripts/setup.sh installs Debian's chromium and chromium-driver")
    if not PPROF.exists():
        pytest.fail("Google pprof missing: scripts/setup.sh builds it into .tools/pprof")
    exe = build_c("cpu_chain.c", tmp_path)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    seen: dict[str, Any] = {}

    async def workload(run: PipelineRun) -> None:
        # 10 s, twice the symbolizer's maps refresh interval: if the agent first saw the pid in the
        # fork-exec window (the parent's maps), hot_leaf's later samples are still symbolized.
        started = time.time()
        proc = await asyncio.create_subprocess_exec(str(exe), "10", "2", stdout=asyncio.subprocess.PIPE)
        seen["pid"] = proc.pid
        await proc.communicate()
        ended = time.time()
        await asyncio.to_thread(wait_for_data, base)
        # The page is served by the aggregator on this event loop: the browser runs in a thread.
        seen.update(await asyncio.to_thread(drive_page, base, tmp_path, (started, ended)))
        (tmp_path / "download.pb.gz").write_bytes(await asyncio.to_thread(fetch, seen["pprof_url"]))
        # The page's totals for our workload against what the aggregator exported for it (kept in
        # memory by the harness). Our process only, on both sides: the agent profiles every process
        # named cpu_chain on the host, and others (another test's, on a shared machine) may name a
        # service, which the page's service filter rightly leaves out while their comm still matches.
        # A loaded agent may still deliver late cpu_chain batches, so bracket the request.
        def exported(ptype: str, ours: bool = True) -> int:
            return sum(s.values[0] for s in run.samples(ProfileType(ptype))
                       if s.process_name == "cpu_chain" and (s.pid == seen["pid"]) == ours)

        for ptype in ("cpu", "wall"):
            before = exported(ptype)
            api = json.loads(await asyncio.to_thread(
                fetch, f"{base}/api/flamegraph?type={ptype}&service=cpu_chain&pid={seen['pid']}"))
            seen[f"{ptype}_totals"] = (before, api["total"], exported(ptype))
            seen[f"{ptype}_others"] = exported(ptype, ours=False)
        # The page's total for the dragged range is the API's for the range in the page's URL.
        selected = urllib.parse.urlsplit(seen["selected_url"]).query
        seen["selected_api_total"] = json.loads(await asyncio.to_thread(fetch, f"{base}/api/flamegraph?{selected}"))[
            "total"]

    with NatsServer() as nats:
        asyncio.run(run_pipeline(nats.url, [ProfileType.CPU, ProfileType.WALL], workload,
                                 output_dir=tmp_path / "profiles", export_interval_s=1.0,
                                 agent_overrides={"target_comm": "^cpu_chain$"},
                                 aggregator_overrides={"web_address": f"127.0.0.1:{port}"}))

    assert {"all", "cpu_chain", "run_thread", "outer", "middle", "hot_leaf"} <= seen["frames"], seen["frames"]
    assert seen["status"].startswith("cpu:"), seen["status"]
    assert seen["highlighted"] == {"hot_leaf"}, seen["highlighted"]
    assert seen["search_details"].startswith("search:"), seen["search_details"]
    assert "hot_leaf" in seen["tooltip"] and "total" in seen["tooltip"] and "self" in seen["tooltip"]
    assert " s (" in seen["tooltip"] or " ms (" in seen["tooltip"], seen["tooltip"]  # ns shown as s/ms
    assert seen["root_after_zoom"] > 0.95  # zoomed: middle (and its ancestors) fill the width
    assert "type=wall" in seen["wall_url"] and seen["wall_status"].startswith("wall"), seen["wall_status"]
    assert "service=cpu_chain" in seen["pprof_url"] and "type=cpu" in seen["pprof_url"]
    # Switching type shows exactly what the aggregator exported for the wall profile; how much
    # wall time the agent records for cpu_chain varies with the machine's load, so no fixed amount.
    for ptype in ("cpu", "wall"):
        before, page_total, after = seen[f"{ptype}_totals"]
        assert before <= page_total <= after, (ptype, before, page_total, after)
        print(f"cpu_chain {ptype}: page {page_total / 1e9:.2f} s, exported {before / 1e9:.2f}-{after / 1e9:.2f} s"
              f" (other processes named cpu_chain: {seen[f'{ptype}_others'] / 1e9:.2f} s)")
    assert seen["cpu_totals"][1] > 0
    # The top table: hot_leaf on top by self; by total, largest first, then smallest first; a click
    # on its row zooms the graph to it (full width) and highlights it.
    assert seen["top_by_self"][0][0] == "hot_leaf", seen["top_by_self"][:5]
    totals = [total for _, _, total in seen["top_by_total"]]
    assert len(totals) > 3 and totals == sorted(totals, reverse=True), seen["top_by_total"][:8]
    assert [t for _, _, t in seen["top_by_total_ascending"]] == sorted(totals)
    assert seen["focused_fill"].upper() == HIGHLIGHT
    # The timeline's drag over the first half of cpu_chain's exports: less than the whole range, not nothing,
    # and exactly the API's total for the selected range; the table's hot_leaf follows.
    whole, part = seen["range_total"], seen["selected_total"]
    assert 0 < part < whole and part == seen["selected_api_total"], (part, whole, seen["selected_api_total"])
    assert seen["selected_hot_leaf"] is not None and seen["selected_hot_leaf"][1] < seen["range_hot_leaf"][1]
    assert "since=" in seen["selected_url"] and "." in seen["selected_url"].split("since=")[1].split("&")[0]
    print(f"cpu_chain: whole range {whole / 1e9:.2f} s, dragged half {part / 1e9:.2f} s")
    assert ("cpu_chain" in seen["wall_frames"]) == (seen["wall_totals"][0] > 0), seen["wall_frames"]
    assert pprof_top_function(tmp_path / "download.pb.gz") == "hot_leaf"


# ---- a fleet of 1,000 hosts (synthetic exports): pickers, table and timeline ---------------------

HOSTS = 1000
EXPORT_STEP_S = 60  # one export a minute, the newest a minute ago


def write_fleet_exports(directory: Path, exports: int) -> list[int]:
    """``exports`` exports of HOSTS hosts; in export i every host has ``hot`` i+1 times 3 and
    ``cold`` i+1 times 1 (in ms of CPU), both under ``main`` of ``app``. Returns their end times:
    one a minute, but two minutes between the second and the third (an export that waited)."""
    from aggregator.exporters.files import LocalFileWriter
    from aggregator.otlp.encode import encode_request
    from aggregator.profile import FleetProfiles, HostProfile
    from tests.test_otlp import frame

    writer = LocalFileWriter(directory)
    now = time.time_ns()
    ends = []
    for i in range(exports):
        end = now - (exports - i + (1 if i < 2 else 0)) * EXPORT_STEP_S * 10**9
        fleet = FleetProfiles(ends[-1] if i == 2 else end - EXPORT_STEP_S * 10**9, end)
        for h in range(HOSTS):
            host = f"host-{h:04d}"
            cpu = HostProfile(host, ProfileType.CPU, fleet.start_ns, end, 1_000_000)
            cpu.add((frame("hot", 3, 0x7F10), frame("main", 9, 0x7F20)), 10, 11, "w", "app", 0, (),
                    (3 * (i + 1) * 10**6,), end - 10**9)
            cpu.add((frame("cold", 4, 0x7F18), frame("main", 9, 0x7F20)), 10, 11, "w", "app", 0, (),
                    ((i + 1) * 10**6,), end - 10**9)
            fleet.hosts[(host, ProfileType.CPU)] = cpu
        writer.write(fleet, encode_request(fleet, "svc", "1"))
        ends.append(end)
    return ends


def test_page_with_a_thousand_hosts(tmp_path: Path) -> None:
    """Host picker that searches, top table (sorting, focus) and the timeline's drag on 1,000 hosts."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from aggregator.web.server import WebServer
    from aggregator.web.store import RetainedExports

    ends = write_fleet_exports(tmp_path / "exports", 6)
    port = free_port()
    loop = asyncio.new_event_loop()
    server = WebServer("127.0.0.1", port, RetainedExports(tmp_path / "exports"))
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ms = 10**6
    all_hosts = HOSTS * sum(4 * (i + 1) for i in range(6)) * ms  # hot + cold of every export
    driver = browser()
    wait = WebDriverWait(driver, WAIT_S)
    try:
        driver.get(f"http://127.0.0.1:{port}/?type=cpu&since=15m")
        wait.until(lambda d: status_total(d) == all_hosts)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#host-options option")) == HOSTS
        assert len(driver.find_elements(By.CSS_SELECTOR, "#pid-options option")) == HOSTS  # one process each
        # The top table: hot first by self; sorting by total puts main (the caller of both) first.
        assert table(driver)[0] == ("hot", 3 * all_hosts // 4, 3 * all_hosts // 4)
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="total"]').click()
        assert [row[0] for row in table(driver)] == ["main", "hot", "cold"]
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="total"]').click()  # again: smallest first
        assert [row[0] for row in table(driver)] == ["cold", "hot", "main"]
        driver.find_element(By.CSS_SELECTOR, '#top th[data-key="self"]').click()
        # Searching filters the table (and highlights in the graph).
        driver.find_element(By.ID, "search").send_keys("co")
        assert [row[0] for row in table(driver)] == ["cold"]
        driver.find_element(By.ID, "search").send_keys(Keys.BACKSPACE, Keys.BACKSPACE)
        wait.until(lambda d: len(table(d)) == 3)
        # A click on a row zooms the graph to that function.
        width = float(driver.find_element(By.CSS_SELECTOR, "#chart svg").get_attribute("width"))
        driver.find_element(By.CSS_SELECTOR, '#top tr[data-name="cold"]').click()
        wait.until(lambda d: float(widest(d, "cold").get_attribute("width")) / width > 0.95)
        assert "focused" in driver.find_element(By.CSS_SELECTOR, '#top tr[data-name="cold"]').get_attribute("class")
        driver.save_screenshot(str(tmp_path / "thousand-hosts-table.png"))

        # The host picker: typing searches the 1,000 names; choosing one makes a chip and filters.
        picker = driver.find_element(By.ID, "host-input")
        picker.send_keys("host-0999", Keys.ENTER)
        wait.until(lambda d: status_total(d) == all_hosts // HOSTS)
        assert [c.get_attribute("data-host") for c in driver.find_elements(By.CSS_SELECTOR, "#host-chips .chip")] \
            == ["host-0999"]
        assert "host=host-0999" in driver.current_url
        driver.find_element(By.ID, "host-input").send_keys("host-0007", Keys.ENTER)
        wait.until(lambda d: status_total(d) == 2 * all_hosts // HOSTS)
        driver.find_element(By.CSS_SELECTOR, '#host-chips [data-host="host-0999"]').click()  # remove one
        wait.until(lambda d: status_total(d) == all_hosts // HOSTS)
        # the process picker suggests the chosen host's processes; choosing one filters by its pid
        assert [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#pid-options option")] \
            == ["10 app on host-0007"]
        driver.find_element(By.ID, "pid").send_keys("10 app on host-0007", Keys.ENTER)
        wait.until(lambda d: "pid=10" in d.current_url)
        assert status_total(driver) == all_hosts // HOSTS

        # The timeline: six bars; a drag over the last part selects it, and totals follow.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#timeline .bars rect")) == 6)
        # CPU time adds up, so a bar's height is its value per second: the third export, which
        # covers two minutes, is twice as wide as the others and no taller for it.
        bars = timeline_bars(driver)
        assert [v for _, _, v, _ in bars] == [(i + 1) * 4 * ms for i in range(6)]
        assert abs(bars[2][1] - 2 * bars[3][1]) <= 2, bars
        factors = [h * w / v for _, w, v, h in bars]
        assert max(factors) <= 1.01 * min(factors), bars
        svg = driver.find_element(By.CSS_SELECTOR, "#timeline svg")
        since_ns, until_ns = int(svg.get_attribute("data-since-ns")), int(svg.get_attribute("data-until-ns"))
        fraction = (ends[3] - EXPORT_STEP_S * 10**9 / 2 - since_ns) / (until_ns - since_ns)  # mid export 3
        drag_on_timeline(driver, fraction, 0.999)
        # exports 4, 5 and 6 of host-0007 (values 4, 5, 6 times hot+cold)
        wait.until(lambda d: status_total(d) == (4 + 5 + 6) * 4 * ms)
        assert table(driver) == [("hot", 3 * 15 * ms, 3 * 15 * ms), ("cold", 15 * ms, 15 * ms),
                                 ("main", 0, 4 * 15 * ms)]
        assert "selected" in driver.find_element(By.ID, "selection").text
        driver.save_screenshot(str(tmp_path / "thousand-hosts-timeline.png"))
        driver.find_element(By.ID, "clear-selection").click()
        wait.until(lambda d: status_total(d) == all_hosts // HOSTS)
    except Exception:
        driver.save_screenshot(str(tmp_path / "failure.png"))
        print(f"status {driver.find_element(By.ID, 'status').text!r} (total {status_total(driver)}); "
              f"table {table(driver)[:5]}; screenshot {tmp_path / 'failure.png'}")
        print("browser console:", driver.get_log("browser"))
        raise
    finally:
        driver.quit()
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
    print(f"screenshots in {tmp_path}")
