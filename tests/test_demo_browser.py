"""The Gradio demo as a person uses it (issue 12): a real headless Chromium, driven by selenium, opens
`dapt demo`'s page, reads the model's measured results beside the label, types a review, submits it and
reads the label the page shows. The model is a tiny BERT classifier with the real vocabulary, saved like
an exported folder (config.json's `dapt` entry, `results/<set>.json`), so no training is needed.

Needs Debian's `chromium` and `chromium-driver` and `pip install selenium` (`.ci/run` installs them);
skipped without them, unless DAPT_REQUIRE_BROWSER=1 (CI), where a missing browser is a failure."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from conftest import free_port

pytestmark = pytest.mark.ux

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
RESULTS = {"set": "imdb-test", "split": "test", "n_examples": 25000, "accuracy": 0.9132,
           "accuracy_ci": [0.9097, 0.9166], "f1_macro": 0.9131, "f1_macro_ci": [0.9096, 0.9165]}
REVIEWS = [  # candidates; the test types one that the model calls negative and one it calls positive
    "A wonderful film: the acting is superb and the story kept me hooked until the very end.",
    "Dull and predictable. The dialogue is terrible and I want those two hours back.",
    "I loved every minute of it.",
    "The worst movie I have seen this year.",
    "An average thriller with a few good scenes.",
    "Brilliant cast, clumsy script, gorgeous photography.",
    "Nothing happens for two hours and then it just stops.",
    "My kids watched it three times in a row!",
]


def _browser_or_skip():
    """selenium's webdriver module, or a skip (a failure under DAPT_REQUIRE_BROWSER=1) naming what is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
        missing.append("selenium (pip install selenium)")
    try:
        import gradio  # noqa: F401
    except ImportError:
        missing.append("gradio (pip install -e '.[demo]')")
    if missing:
        why = "no headless browser for the demo test: missing " + ", ".join(missing) + \
              " (apt-get install chromium chromium-driver; .ci/run installs them)"
        if os.environ.get("DAPT_REQUIRE_BROWSER") == "1":
            pytest.fail(why + " [DAPT_REQUIRE_BROWSER=1]")
        pytest.skip(why)
    return webdriver


@pytest.fixture
def chromium(tmp_path, monkeypatch):
    """Headless Chromium (root in a container: no sandbox, no /dev/shm, no network side jobs); Selenium
    Manager is never asked to fetch a driver or a browser: both paths are given, and SE_OFFLINE is set."""
    webdriver = _browser_or_skip()
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-extensions", "--window-size=1280,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        opts.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def classifier(tmp_path, tokenizer_dir) -> Path:
    """An exported-model-like folder: a tiny 2-class BERT (real vocabulary), its tokenizer, training's
    truncation settings in config.json and one measured-results file."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    out = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config)
    tok.save_pretrained(out)
    dapt_entry = {"stage": "finetune", "max_seq_length": 64, "truncation": "head+tail", "head_tokens": 16}

    def save() -> None:
        model.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(dict(cfg, dapt=dapt_entry), indent=2))

    save()
    # Random weights put every review on one side, near 50%: move the decision threshold (the classifier's
    # bias) to the middle of the candidates' logit margins and widen them, so that half of the reviews read
    # negative and half positive, each with a score of at least 88%.
    from dapt.serve.predict import Predictor

    probs = Predictor(out, device="cpu").probabilities(REVIEWS)
    margins = probs[:, 1].log() - probs[:, 0].log()
    ordered = sorted(margins.tolist())
    centre = (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2
    scale = 2.0 / float((margins - centre).abs().min())
    with torch.no_grad():
        model.classifier.bias[1] -= centre
        model.classifier.weight.mul_(scale)
        model.classifier.bias.mul_(scale)
    save()
    (out / "results").mkdir()
    (out / "results" / f"{RESULTS['set']}.json").write_text(json.dumps(RESULTS))
    return out


def _shown_label(driver) -> str:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#label .output-class")).strip()
    except StaleElementReferenceException:  # the label re-rendered between finding and reading it
        return ""


def _submit(driver, text: str, before: str) -> str:
    """Type `text` into the review box as a person would, press Submit, wait for a new label; the label shown."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    box = driver.find_element(By.CSS_SELECTOR, "#review textarea")
    box.clear()
    box.send_keys(text)
    assert box.get_attribute("value") == text
    driver.find_element(By.CSS_SELECTOR, "#submit").click()
    WebDriverWait(driver, 20, poll_frequency=0.1).until(
        lambda d: _shown_label(d) in ("negative", "positive") and _shown_label(d) != before,
        message=f"no new label on the page after submitting {text!r} (shown: {_shown_label(driver)!r})")
    return _shown_label(driver)


def test_demo_page_in_a_real_browser(chromium, classifier, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dapt.serve.app import ELEM_IDS, build_demo
    from dapt.serve.predict import Predictor

    assert ELEM_IDS == {"review": "review", "submit": "submit", "label": "label", "results": "measured-results"}
    predictor = Predictor(classifier, device="cpu")
    expected = {}  # label -> (a review the model gives that label, its score)
    for p in predictor.predict(REVIEWS):
        expected.setdefault(p["label"], (p["text"], p["score"]))
    assert set(expected) == {"negative", "positive"}, f"the tiny model labels every candidate {set(expected)}"
    assert min(score for _, score in expected.values()) > 0.85

    demo = build_demo(str(classifier), device="cpu")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        chromium.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(chromium, 30, poll_frequency=0.1)
        panel = wait.until(lambda d: d.find_element(By.ID, "measured-results").text.strip() and
                           d.find_element(By.ID, "measured-results"), message="no measured-results panel")
        text = panel.text
        assert "imdb-test" in text and "25000" in text, text
        assert "0.9132 [0.9097, 0.9166]" in text and "0.9131 [0.9096, 0.9165]" in text, text
        assert "Not evaluated yet" not in text
        assert chromium.find_element(By.ID, "label").is_displayed() and panel.is_displayed()

        shown = ""
        for label in ("positive", "negative"):  # the second must replace the first on the page
            review, score = expected[label]
            shown = _submit(chromium, review, before=shown)
            assert shown == label == Predictor(classifier, device="cpu").predict([review])[0]["label"]
            label_text = chromium.find_element(By.ID, "label").text
            assert f"{round(score * 100)}%" in label_text, label_text  # the score beside the label

        shot = tmp_path / "demo_page.png"
        assert chromium.save_screenshot(str(shot))
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 800 and height >= 600 and len(data) > 20_000, (width, height, len(data))
        keep = os.environ.get("DAPT_DEMO_SCREENSHOT")  # to look at the page: where to copy the screenshot
        if keep:
            shutil.copyfile(shot, keep)
    finally:
        demo.close()


def test_demo_page_says_when_not_evaluated(tmp_path):
    """No `results/` in the model folder: the panel says so instead of showing an empty table."""
    from dapt.serve.app import NOT_EVALUATED, results_markdown

    assert results_markdown([]) == NOT_EVALUATED
    table = results_markdown([RESULTS, dict(RESULTS, set="yelp|test", split=None, accuracy_ci=None)])
    assert "| imdb-test | test | 25000 | 0.9132 [0.9097, 0.9166] | 0.9131 [0.9096, 0.9165] |" in table
    assert "| yelp\\|test | - | 25000 | 0.9132 | 0.9131 [0.9096, 0.9165] |" in table
