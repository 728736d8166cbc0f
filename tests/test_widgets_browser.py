"""Real-browser test of the widgets chapter: JupyterLab serves a copy of nbs/, headless Chromium (selenium)
opens nbs/06_widgets.ipynb, runs all cells from the Run menu, and we use the widgets as a person would:
pick another label in the cluster explorer, switch its colouring, press "Next failure" in the retrieval browser,
and check that the views update. Screenshots of both widgets go to the test's temporary folder: the test writes
nothing into the repository.

The README's widget figures come from the same session, run as a script on a trained model: the one command that
writes them (its parameters go into the notebook copy with papermill; before the screenshots it picks a label with
an ID switch and a query with both correct and wrong matches). The README's figures: PNL pre-trained 24 epochs on
the built-in data (mAP ~55 on the built-in benchmark), from the repository root:

    .venv/bin/python -m lupnl.pretrain --out_dir runs/pnl24 --epochs 24 --lr_steps 18 --eval_every 6
    .venv/bin/python tests/test_widgets_browser.py --out images --checkpoint runs/pnl24/checkpoint.pth

Needs chromium + chromedriver (.ci/system-deps installs them on Debian). Without them the test is skipped
locally and fails under CI (CI=true). Nothing is fetched from the network."""
import json, os, re, secrets, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "06_widgets.ipynb"
SHOTS = {"lupnl-cluster-explorer": "widget_cluster_explorer.png", "lupnl-retrieval-browser": "widget_retrieval_browser.png"}
RUN_TIMEOUT = 900        # s for "Run All Cells" (UMAP's first-call numba compile alone is ~20 s on 2 cores)
UI_TIMEOUT = 120         # s for the page / a widget to react


def _find(env, default):
    p = os.environ.get(env) or default
    return p if p and Path(p).is_file() else None


def _require_browser():
    "(chromium, chromedriver) paths; skip (locally) or fail (under CI) when missing."
    chromium = _find("LUPNL_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
    driver = _find("LUPNL_CHROMEDRIVER", shutil.which("chromedriver") or "/usr/bin/chromedriver")
    missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if p is None]
    try: import selenium  # noqa: F401
    except ImportError: missing.append("the selenium package")
    if missing:
        msg = f"browser test needs {', '.join(missing)} (.ci/system-deps installs chromium + chromium-driver)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"): pytest.fail(msg)
        pytest.skip(msg)
    return chromium, driver


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs_here(exe, env):
    "Does the kernel command `exe` run this interpreter's environment (same bin folder, after a PATH lookup)?"
    return Path(shutil.which(exe, path=env.get("PATH")) or exe).parent == Path(sys.executable).parent


def _ensure_venv_kernel(env):
    "Make the `python3` kernelspec the lab will use run this interpreter's environment (install it there if not)."
    probe = ("from jupyter_client.kernelspec import KernelSpecManager as K;"
             "print(K().get_kernel_spec('python3').argv[0])")
    def argv0(): return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                       check=True).stdout.strip()
    if not _runs_here(argv0(), env):
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
                       env=env, check=True, capture_output=True)
    exe = argv0()
    assert _runs_here(exe, env), f"kernel python3 runs {exe}, not {sys.executable}"


def _write_settings(root):
    "Lab settings for a quiet, deterministic, offline session (no news / update checks, every cell in the DOM)."
    settings = {"@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
                "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none", "autoStartDefaultKernel": True},
                "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False}}
    for name, value in settings.items():
        ext, plugin = name.rsplit("/", 1)
        p = root / "settings" / ext / f"{plugin}.jupyterlab-settings"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(value))
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "jupyter_server_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                    "extension_manager": "readonly"}}))


class Lab:
    "A JupyterLab server on 127.0.0.1 serving `root_dir`, with a token, in its own process group."
    def __init__(self, root_dir, home):
        self.port, self.token, self.home = _free_port(), secrets.token_hex(16), home
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
                    "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
                    "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython"),
                    "JUPYTER_PLATFORM_DIRS": "1", "PYTHONUNBUFFERED": "1",
                    # the kernel imports lupnl from this checkout (as nbdev_test does), whatever is installed
                    "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
        self.env.pop("MPLBACKEND", None)  # the kernel uses the inline backend, as a person's would
        _ensure_venv_kernel(self.env)
        self.log_path = home / "lab.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={root_dir}"] + (["--allow-root"] if os.geteuid() == 0 else []),
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + UI_TIMEOUT
        while True:
            if self.proc.poll() is not None: raise RuntimeError(f"JupyterLab exited early:\n{self.logs()}")
            try:
                if self.api("status"): break
            except OSError: pass
            if time.time() > deadline: raise TimeoutError(f"JupyterLab did not start in {UI_TIMEOUT}s:\n{self.logs()}")
            time.sleep(0.5)

    def api(self, path, method="GET", body=None):
        req = urllib.request.Request(f"{self.url}/api/{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else {}

    def logs(self, tail=4000):
        self.log.flush()
        return self.log_path.read_text()[-tail:]

    def stop(self):
        "Shut kernels and server down through the API, then make sure the process group is gone."
        if self.proc.poll() is None:
            try: self.api("shutdown", method="POST")
            except OSError: pass
            try: self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try: self.proc.wait(15)
                except subprocess.TimeoutExpired: os.killpg(self.proc.pid, signal.SIGKILL); self.proc.wait()
        self.log.close()


def _chrome(chromium, chromedriver, profile):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must not try to download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
              "--disable-extensions", f"--user-data-dir={profile}", "--window-size=1500,1300",
              "--force-device-scale-factor=1"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)


def _wait(fn, timeout, what, poll=0.5):
    "Poll `fn` until it returns a truthy value; fail with `what` after `timeout` seconds."
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            v = fn()
            if v: return v
        except Exception as e: last = e  # stale elements while the DOM is being re-rendered
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))


def _tracebacks(driver):
    from selenium.webdriver.common.by import By
    outs = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output")
    return [o.text for o in outs if "Traceback (most recent call last)" in o.text]


def _prompts(driver):
    from selenium.webdriver.common.by import By
    return [p.text.strip() for p in driver.find_elements(By.CSS_SELECTOR, ".jp-CodeCell .jp-InputPrompt")]


def _accept_dialogs(driver):
    "Accept any open dialog (e.g. 'Select Kernel' when the kernel was not ready): True if there was one."
    from selenium.webdriver.common.by import By
    buttons = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    for b in buttons: b.click()
    return bool(buttons)


def _click_run_all(driver):
    "Run > Run All Cells, through the menu as a person would."
    from selenium.webdriver.common.by import By
    _wait(lambda: [m for m in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-item") if m.text.strip() == "Run"],
          UI_TIMEOUT, "the Run menu")[0].click()
    _wait(lambda: [i for i in driver.find_elements(By.CSS_SELECTOR, ".lm-Menu-item .lm-Menu-itemLabel")
                   if i.text.strip() == "Run All Cells"], UI_TIMEOUT, "the Run All Cells entry")[0].click()


def _run_all(driver, timeout):
    """Run all cells and wait until every code cell has an execution count. Fails at once if a cell raised.
    A dialog (kernel selection) is accepted; if nothing has started a minute after the click, click again."""
    _click_run_all(driver)
    clicked, deadline = time.time(), time.time() + timeout
    while time.time() < deadline:
        try:
            if _accept_dialogs(driver): time.sleep(2)
            tb = _tracebacks(driver)
            if tb: pytest.fail("a notebook cell failed in the browser:\n" + tb[0][-3000:])
            prompts = _prompts(driver)
            if prompts and all(re.fullmatch(r"\[\d+\]:", p) for p in prompts): return
            if all(p == "[ ]:" for p in prompts) and time.time() - clicked > 60:
                _click_run_all(driver)
                clicked = time.time()
        except pytest.fail.Exception: raise
        except Exception: pass  # stale elements while the notebook re-renders
        time.sleep(1)
    raise TimeoutError(f"cells still not run after {timeout}s: prompts {_prompts(driver)}")


def _img_srcs(el, css):
    from selenium.webdriver.common.by import By
    return [i.get_attribute("src") for i in el.find_elements(By.CSS_SELECTOR, css)]


def _start_kernel(lab, path):
    """Start the notebook's session and kernel through the REST API and wait until the kernel is idle, before the page
    opens. A page that starts the kernel itself races it on a busy machine: jupyter_server may answer the first
    websocket with a 500 ('kernel_ws_protocol'), a second kernel gets started, and the page ends up on a kernel that
    never runs its cells, or without the widget models ("Error displaying widget: model not found")."""
    s = lab.api("sessions", "POST", {"path": path, "name": Path(path).name, "type": "notebook", "kernel": {"name": "python3"}})
    kid = s["kernel"]["id"]
    from jupyter_client import BlockingKernelClient
    kc = BlockingKernelClient(connection_file=str(_wait(lambda: next(lab.home.glob(f"runtime/kernel-{kid}.json"), None),
                                                       UI_TIMEOUT, "the kernel's connection file")))
    kc.load_connection_file()
    kc.start_channels()
    try: kc.wait_for_ready(timeout=UI_TIMEOUT)   # the kernel answers kernel_info: it is up
    finally: kc.stop_channels()
    return kid


def _parameterize(path, parameters):
    "Inject papermill parameters into the notebook at `path` (a cell after its `parameters` cell), in place."
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook
    nbformat.write(parameterize_notebook(load_notebook_node(str(path)), parameters), path)


def _show_mixed_label(ex, tries=12):
    "Select, from the suspects list, the first label whose crops hold several true people (an ID switch), if any."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    info = lambda: ex.find_element(By.CSS_SELECTOR, ".widget-html").text
    suspects = Select(ex.find_element(By.CSS_SELECTOR, ".widget-select select"))
    for value in [o.get_attribute("value") for o in suspects.options][:tries]:
        suspects.select_by_value(value)
        label = suspects.first_selected_option.text.split(":")[0]
        _wait(lambda: f"label {label}:" in info(), UI_TIMEOUT, f"label {label}")
        people = info().split("true identities: ")[-1].split(", ")
        if len(people) > 1 and not any(p.startswith("junk") for p in people): return label


def _show_mixed_query(rb):
    "Select the first query whose AP is between 0.4 and 0.9: correct and wrong matches side by side."
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    queries = Select(rb.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
    for o in queries.options:
        ap = re.search(r"AP (\d\.\d+)", o.text)
        if ap and 0.4 <= float(ap.group(1)) <= 0.9:
            queries.select_by_visible_text(o.text)
            _wait(lambda: f"query {o.text.split()[0]} (" in next(h.text for h in rb.find_elements(By.CSS_SELECTOR, ".widget-html")
                                                                if "query #" in h.text), UI_TIMEOUT, "the query")
            return o.text


def widgets_session(shots_dir, parameters=None, showcase=False):
    """Run 06_widgets in JupyterLab + headless Chromium, use both widgets, save their screenshots in `shots_dir`
    (returned: {name: path}). `parameters`: papermill parameters for the notebook (e.g. a checkpoint). `showcase`:
    before each screenshot, pick a label with an ID switch and a query with both correct and wrong matches."""
    chromium, chromedriver = _require_browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    home = Path(tempfile.mkdtemp(prefix="lupnl-widgets-browser-"))
    lab = driver = None
    ok = False
    try:
        root = home / "repo"
        shutil.copytree(REPO / "nbs", root / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        if parameters: _parameterize(root / "nbs" / NOTEBOOK, parameters)
        shots = {k: Path(shots_dir) / name for k, name in SHOTS.items()}
        Path(shots_dir).mkdir(parents=True, exist_ok=True)
        _write_settings(home)
        t0 = time.time()
        lab = Lab(root, home)
        spec = lab.api("kernelspecs")["kernelspecs"]["python3"]["spec"]["argv"][0]
        assert _runs_here(spec, lab.env), f"the lab's python3 kernel runs {spec}, not {sys.executable}"
        driver = _chrome(chromium, chromedriver, home / "chrome-profile")
        _start_kernel(lab, f"nbs/{NOTEBOOK}")
        driver.get(f"{lab.url}/lab/tree/nbs/{NOTEBOOK}?token={lab.token}")
        # the notebook is open and its kernel is ready
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell"), UI_TIMEOUT, "the notebook")
        _wait(lambda: not _accept_dialogs(driver) and
              driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"),
              UI_TIMEOUT, "an idle kernel")
        _run_all(driver, RUN_TIMEOUT)
        t_run = time.time() - t0

        # --- cluster explorer: rendered with its controls and a grid of crops ---
        # the notebook shows each widget on synthetic data first, then on the built-in data: use the last one
        ex = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".lupnl-cluster-explorer"), UI_TIMEOUT,
                   "the cluster explorer")[-1]
        for css in (".widget-toggle-buttons", ".widget-dropdown select", ".widget-select select", ".widget-slider"):
            assert ex.find_elements(By.CSS_SELECTOR, css), f"cluster explorer has no {css}"
        _wait(lambda: len(_img_srcs(ex, ".lupnl-grid img")) > 0, UI_TIMEOUT, "grid images")
        plot = ex.find_element(By.CSS_SELECTOR, ".widget-image")  # the UMAP map comes first
        assert plot.size["width"] > 200 and plot.size["height"] > 200, plot.size
        if showcase: print("explorer shows label", _show_mixed_label(ex))
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", ex)
        time.sleep(1)
        ex.screenshot(str(shots["lupnl-cluster-explorer"]))

        # choose another label in the dropdown: the info line, the grid images and the map change
        select = Select(ex.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
        current = select.first_selected_option.get_attribute("value")
        other = next(o for o in select.options if o.get_attribute("value") != current)
        other_label = other.text.split(" ")[0]
        grid_before, plot_before = _img_srcs(ex, ".lupnl-grid img"), plot.get_attribute("src")
        select.select_by_visible_text(other.text)
        _wait(lambda: f"label {other_label}:" in ex.find_element(By.CSS_SELECTOR, ".widget-html").text,
              UI_TIMEOUT, f"the info line to show label {other_label}")
        _wait(lambda: _img_srcs(ex, ".lupnl-grid img") and _img_srcs(ex, ".lupnl-grid img") != grid_before,
              UI_TIMEOUT, "the grid to change")
        _wait(lambda: plot.get_attribute("src") != plot_before, UI_TIMEOUT, "the map to redraw")
        # colour by the true identity: the toggle button becomes active and the map is redrawn
        plot_before = plot.get_attribute("src")
        button = next(b for b in ex.find_elements(By.CSS_SELECTOR, ".widget-toggle-buttons button")
                      if b.text.strip() == "true identity")
        button.click()
        _wait(lambda: "mod-active" in button.get_attribute("class"), UI_TIMEOUT, "the toggle to become active")
        _wait(lambda: plot.get_attribute("src") != plot_before, UI_TIMEOUT, "the map to redraw in new colours")

        # --- retrieval browser: "Next failure" moves to another query ---
        rb = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".lupnl-retrieval-browser"), UI_TIMEOUT,
                   "the retrieval browser")[-1]
        for css in (".widget-dropdown select", ".widget-slider", ".widget-checkbox", ".widget-button"):
            assert rb.find_elements(By.CSS_SELECTOR, css), f"retrieval browser has no {css}"
        _wait(lambda: len(_img_srcs(rb, ".lupnl-results img")) > 1, UI_TIMEOUT, "the query and its results")
        if showcase: print("browser shows query", _show_mixed_query(rb))
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", rb)
        time.sleep(1)
        rb.screenshot(str(shots["lupnl-retrieval-browser"]))
        header = lambda: next(h.text for h in rb.find_elements(By.CSS_SELECTOR, ".widget-html") if "query #" in h.text)
        def query_no(): return int(re.search(r"query #(\d+)", header()).group(1))
        q0, results_before = query_no(), _img_srcs(rb, ".lupnl-results img")
        next_btn = next(b for b in rb.find_elements(By.CSS_SELECTOR, "button") if "Next failure" in b.text)
        next_btn.click()
        q1 = _wait(lambda: query_no() != q0 and query_no(), UI_TIMEOUT, "Next failure to change the query")
        assert re.search(r"AP (\d\.\d+)", header()) and float(re.search(r"AP (\d\.\d+)", header()).group(1)) < \
            float(rb.find_element(By.CSS_SELECTOR, ".widget-slider .widget-readout").text), header()
        _wait(lambda: _img_srcs(rb, ".lupnl-results img") != results_before, UI_TIMEOUT, "the results to change")
        dropdown = Select(rb.find_element(By.CSS_SELECTOR, ".widget-dropdown select"))
        _wait(lambda: dropdown.first_selected_option.get_attribute("value") is not None
              and dropdown.first_selected_option.text.startswith(f"#{q1} "), UI_TIMEOUT, "the dropdown to follow")
        print(f"\nbrowser test: lab start + run all cells {t_run:.0f}s, total {time.time() - t0:.0f}s")
        for p in shots.values(): assert p.stat().st_size > 10_000, p
        ok = True
        return shots
    except Exception:
        if lab is not None: print("JupyterLab log tail:\n" + lab.logs())
        if driver is not None:
            try: driver.save_screenshot(str(home / "failure.png")); print(f"page screenshot: {home / 'failure.png'}")
            except Exception: pass
        raise
    finally:
        if driver is not None: driver.quit()
        if lab is not None: lab.stop()
        if ok: shutil.rmtree(home, ignore_errors=True)
        else: print(f"kept {home} (lab.log, failure.png) for inspection")


@pytest.mark.slow
def test_widgets_in_jupyterlab(tmp_path):
    widgets_session(tmp_path / "shots")
    assert sorted(p.name for p in (tmp_path / "shots").iterdir()) == sorted(SHOTS.values())


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Screenshots of the widgets of nbs/06_widgets.ipynb, from a real JupyterLab "
                                 "session (the README's figures: --out images).")
    ap.add_argument("--out", required=True, help="folder for widget_cluster_explorer.png and widget_retrieval_browser.png")
    ap.add_argument("--checkpoint", help="a lupnl checkpoint (pre-training or fine-tuning checkpoint.pth, backbone.pth, .onnx)")
    ap.add_argument("--bench", help="benchmark folder for the retrieval browser (default: the run's own, else the built-in one)")
    ap.add_argument("--data", help="LMDB for the cluster explorer (default: the pre-training run's, else the built-in one)")
    args = ap.parse_args()
    params = {k: str(Path(v).resolve()) for k, v in vars(args).items() if k in ("checkpoint", "bench", "data") and v}
    t0 = time.time()
    for name, path in widgets_session(Path(args.out), params, showcase=True).items(): print(f"{name}: {path}")
    print(f"done in {time.time() - t0:.0f}s")
