"""The playground page (``GET /`` of the Serve app) and a run's report.html, in a real headless Chromium.

The browser is Debian's ``chromium`` driven through ``chromium-driver`` by selenium (``scripts/bootstrap.sh``
installs both as root); where either is absent the tests are skipped with the reason printed. Screenshots are
saved under each test's ``tmp_path`` (the path is printed)."""

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from sft_ray.config import load_config

KEY = "sk-playground-test-key-456"
PORT = 8126  # test_serve 8123, test_serve_adapter/_embedded 8124, test_serve_cli 8125
MAX_TOKENS = 12
ROOT = Path(__file__).resolve().parents[1]


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the [test] extra: scripts/bootstrap.sh)"
    for name in ("chromium", "chromedriver"):
        if not shutil.which(name):
            return (f"{name} not found: the browser tests need Debian's chromium and chromium-driver "
                    "(scripts/bootstrap.sh installs them when run as root with apt-get)")
    return None


def _say(config, text: str) -> None:
    """Printed past pytest's capture, so that a skip's reason shows in the run's output, not only in -ra."""
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is None:  # -p no:capture
        print(f"\n[test_playground] {text}", flush=True)
        return
    with capman.global_and_fixture_disabled():
        print(f"\n[test_playground] {text}", flush=True)


@contextmanager
def chromium():
    """Headless Chromium driven by selenium through Debian's chromedriver (nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,1000", "--disable-extensions", "--no-first-run"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def browser(pytestconfig):
    reason = _missing()
    if reason:
        _say(pytestconfig, f"SKIPPED: {reason}")
        pytest.skip(reason)
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def worded_model_dir(tmp_path_factory, smol_tok):
    """conftest's tiny model with larger random weights: its greedy answers are words (conftest's, with the
    default initializer range, answers only newlines, which would show nothing on the page)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-worded")
    cfg = LlamaConfig(
        vocab_size=len(smol_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=smol_tok.bos_token_id, eos_token_id=smol_tok.eos_token_id,
        pad_token_id=smol_tok.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    smol_tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(ray_local, worded_model_dir):
    from ray import serve

    from sft_ray.serve import start

    cfg = load_config(None, [f"serve.port={PORT}", "serve.model_name=tiny", "serve.max_tokens_limit=64",
                             "serve.default_max_tokens=16"])
    url = start(str(worded_model_dir), cfg, api_key=KEY)
    yield url
    serve.shutdown()


def _screenshot(driver, path: Path, pytestconfig) -> None:
    """The whole page (the window made as tall as the page first) as a PNG, its path printed."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1100, min(max(height, 600) + 150, 5000))
    assert driver.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, len(data)
    _say(pytestconfig, f"screenshot: {path}")


def _text(el) -> str:
    return el.get_attribute("textContent")


def test_page_is_served_without_the_key_and_fetches_nothing_from_elsewhere(server):
    r = httpx.get(server.removesuffix("/v1") + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert "<textarea" in r.text and "v1/chat/completions" in r.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)  # no CDN, no fonts: works offline


def test_playground_streams_the_greedy_answer(browser, server, tmp_path, pytestconfig):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    find = browser.find_element
    wait = WebDriverWait(browser, 60)
    browser.get(server.removesuffix("/v1") + "/")

    # the server has a key and none was given: the first call's 401 becomes a clear message, and the key field shows
    error = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed()
                       else False)
    assert "needs an API key" in error.text, error.text
    key = find(By.ID, "key")
    assert key.is_displayed()

    key.send_keys(KEY)
    find(By.ID, "temperature").clear()
    find(By.ID, "temperature").send_keys("0")
    find(By.ID, "max-tokens").send_keys(str(MAX_TOKENS))
    prompt = find(By.ID, "prompt")
    # count the answer's updates on the page: a streamed answer arrives in several pieces
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver((ms) => { window.updates += ms.filter((m) => m.target.classList &&
            m.target.classList.contains('content')).length; })
          .observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});""")

    def ask(text: str, turn: int) -> str:
        lines = text.split("\n")
        prompt.click()
        prompt.send_keys(lines[0])
        for line in lines[1:]:  # Shift+Enter is a new line in the message, not a send
            ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
            prompt.send_keys(line)
        assert prompt.get_attribute("value") == text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg.user")) == turn - 1
        prompt.send_keys(Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg.assistant[data-done]")) == turn
                   and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
        assert not find(By.ID, "error").is_displayed(), find(By.ID, "error").text
        assert prompt.get_attribute("value") == ""
        answer = browser.find_elements(By.CSS_SELECTOR, "#log .msg.assistant")[-1]
        assert answer.get_attribute("data-finish-reason") in ("stop", "length")
        return _text(answer.find_element(By.CLASS_NAME, "content"))

    client = openai.OpenAI(base_url=server, api_key=KEY)

    def greedy(messages):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content

    first = "Name three colours."
    shown = ask(first, 1)
    messages = [{"role": "user", "content": first}]
    assert shown == greedy(messages) and shown.strip()
    assert browser.execute_script("return window.updates") >= 2  # shown piece by piece

    second = "And three animals?\nOne per line."
    shown2 = ask(second, 2)
    messages += [{"role": "assistant", "content": shown}, {"role": "user", "content": second}]
    assert shown2 == greedy(messages)  # the whole conversation was sent

    # the conversation stays on the page: both turns, in order
    turns = [(m.get_attribute("class").split()[-1], _text(m.find_element(By.CLASS_NAME, "content")))
             for m in browser.find_elements(By.CSS_SELECTOR, "#log .msg")]
    assert turns == [("user", first), ("assistant", shown), ("user", second), ("assistant", shown2)]

    # an error from the API shows its message (max tokens over the server's limit of 64); the turn is taken back
    find(By.ID, "max-tokens").clear()
    find(By.ID, "max-tokens").send_keys("1000")
    prompt.send_keys("too long", Keys.ENTER)
    wait.until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "HTTP 400" in find(By.ID, "error").text and "above this server's limit of 64" in find(By.ID, "error").text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#log .msg")) == 4
    assert prompt.get_attribute("value") == "too long"

    # Clear while an answer streams starts a new conversation: the next request carries only its own turn
    browser.execute_script("window._bodies = []; const f = window.fetch; window.fetch = (u, o) => {"
                           " if (o && o.body) window._bodies.push(JSON.parse(o.body)); return f(u, o); };")
    find(By.ID, "max-tokens").clear()
    find(By.ID, "max-tokens").send_keys("64")
    prompt.clear()
    prompt.send_keys("a long answer please", Keys.ENTER)
    find(By.ID, "clear").click()
    wait.until(lambda d: not d.find_element(By.ID, "send").get_attribute("hidden"))
    prompt.send_keys("fresh start", Keys.ENTER)
    wait.until(lambda d: len(d.execute_script("return window._bodies")) >= 2)
    wait.until(lambda d: not d.find_element(By.ID, "send").get_attribute("hidden"))
    last = browser.execute_script("return window._bodies")[-1]
    assert [m["content"] for m in last["messages"]] == ["fresh start"], last["messages"]

    _screenshot(browser, tmp_path / "playground.png", pytestconfig)


def check_report(driver, report_html: Path, screenshot: Path, pytestconfig) -> None:
    """``{output_dir}/eval/report.html`` opened from disk: the score table has rows of numbers, the loss plot
    (loss.png beside it) is loaded at its size and is not blank on the page."""
    import io

    from PIL import Image
    from selenium.webdriver.common.by import By

    driver.get(report_html.resolve().as_uri())
    tables = [t for t in driver.find_elements(By.TAG_NAME, "table")
              if [_text(th) for th in t.find_elements(By.CSS_SELECTOR, "tr:first-child th")][:3]
              == ["metric", "before", "after"]]
    assert len(tables) == 1, "no score table"
    rows = [[_text(td) for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in tables[0].find_elements(By.TAG_NAME, "tr")]
    rows = [r for r in rows if r]  # the header row has no td
    assert rows and tables[0].is_displayed() and tables[0].size["height"] > 0
    number = re.compile(r"\d+\.\d+( \(\d+/\d+\))?")  # 0.875 (42/48), 0.0364
    for r in rows:
        assert number.fullmatch(r[1]) and number.fullmatch(r[2]), r
    assert "exact_match" in [r[0] for r in rows]

    img = driver.find_element(By.CSS_SELECTOR, "img[src='loss.png']")
    assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 800
    assert driver.execute_script("return arguments[0].naturalHeight", img) == 450
    assert img.size["width"] > 100 and img.size["height"] > 50, img.size
    driver.execute_script("arguments[0].scrollIntoView()", img)
    with Image.open(io.BytesIO(img.screenshot_as_png)) as shot:
        assert len(shot.convert("L").getcolors(1 << 16)) > 10  # lines and labels drawn, not an empty box
    driver.execute_script("window.scrollTo(0, 0)")
    _screenshot(driver, screenshot, pytestconfig)


def report_in_browser(report_html: Path, screenshot: Path, pytestconfig) -> None:
    """check_report for a test that has made a run of its own (tests/test_train_e2e.py): without a browser the
    reason is printed and that test goes on."""
    reason = _missing()
    if reason:
        _say(pytestconfig, f"report.html not checked in a browser: {reason}")
        return
    with chromium() as driver:
        check_report(driver, report_html, screenshot, pytestconfig)


def test_report_of_a_real_run_renders(browser, tmp_path, pytestconfig):
    """The quickstart's run (the README's first command), where this checkout has one; tests/test_train_e2e.py
    checks the report of the run it trains in the same way (report_in_browser), so CI always checks one."""
    report_html = ROOT / "runs" / "local-cpu" / "eval" / "report.html"
    if not report_html.is_file():
        reason = (f"no quickstart run at {report_html.parent} (tests/test_train_e2e.py checks its own run's "
                  "report in the browser)")
        _say(pytestconfig, f"SKIPPED: {reason}")
        pytest.skip(reason)
    check_report(browser, report_html, tmp_path / "report.png", pytestconfig)
