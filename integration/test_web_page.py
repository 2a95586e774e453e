"""The web page in a real headless Chromium, fed by a real agent and aggregator.

A real agent profiles cpu_chain (two threads spinning in hot_leaf, reached through
main -> run_thread -> outer -> middle -> hot_leaf) with CPU and wall profiles; the
aggregator writes its exports and serves the page. Debian's chromium, driven by
selenium through chromedriver, must show hot_leaf in the flame graph, highlight it on
search, show its total/self in a tooltip, zoom on click and switch to the wall profile;
the page's CPU and wall totals for cpu_chain must equal what the aggregator exported, and
the pprof behind the page's download link must have hot_leaf on top for Google's pprof.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
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
WAIT_S = 120  # generous: a run beside an hour-long soak saw the first views take ~35 s each


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
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, shown on failure
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def drive_page(base: str, shots: Path) -> dict[str, Any]:
    """Everything a person would do on the page; blocking (runs in a thread, off the server's loop)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    seen: dict[str, Any] = {}
    driver = browser()
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    try:
        driver.get(base + "/?type=cpu&since=15m")
        # the service list is filled from the data: choose the workload's executable
        wait.until(lambda d: "cpu_chain" in [o.get_attribute("value") for o in
                                             d.find_elements(By.CSS_SELECTOR, "#service option")])
        Select(driver.find_element(By.ID, "service")).select_by_value("cpu_chain")
        wait.until(lambda d: "service=cpu_chain" in d.current_url)  # the filtered view is drawn
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, frame_css("hot_leaf"))))
        seen["status"] = driver.find_element(By.ID, "status").text
        seen["frames"] = {name for name, _ in frames_and_fills(driver)}

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
        proc = await asyncio.create_subprocess_exec(str(exe), "10", "2", stdout=asyncio.subprocess.PIPE)
        await proc.communicate()
        await asyncio.to_thread(wait_for_data, base)
        # The page is served by the aggregator on this event loop: the browser runs in a thread.
        seen.update(await asyncio.to_thread(drive_page, base, tmp_path))
        (tmp_path / "download.pb.gz").write_bytes(await asyncio.to_thread(fetch, seen["pprof_url"]))
        # The page's totals against what the aggregator exported (kept in memory by the harness).
        # A loaded agent may still deliver late cpu_chain batches, so bracket the request.
        def exported(ptype: str) -> int:
            return sum(s.values[0] for s in run.samples(ProfileType(ptype)) if s.process_name == "cpu_chain")

        for ptype in ("cpu", "wall"):
            before = exported(ptype)
            api = json.loads(await asyncio.to_thread(fetch, f"{base}/api/flamegraph?type={ptype}&service=cpu_chain"))
            seen[f"{ptype}_totals"] = (before, api["total"], exported(ptype))

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
        print(f"cpu_chain {ptype}: page {page_total / 1e9:.2f} s, exported {before / 1e9:.2f}-{after / 1e9:.2f} s")
    assert seen["cpu_totals"][1] > 0
    assert ("cpu_chain" in seen["wall_frames"]) == (seen["wall_totals"][0] > 0), seen["wall_frames"]
    assert pprof_top_function(tmp_path / "download.pb.gz") == "hot_leaf"
