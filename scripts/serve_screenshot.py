"""The web chat of `hybrid-gpt serve` driven in headless Chromium, as a person would use it: pick two models, type
one prompt, wait for both streamed answers, read the figures the page shows; and a screenshot of it.

    uv run python scripts/serve_screenshot.py [OUT.png] [CKPT CKPT]

makes docs/serve-web-chat.png by default: two random checkpoints of the cpu preset's shape (standard AAAA against
hybrid AAMM, with a tokenizer trained on the embedded plays), or the two checkpoints given. Random weights write
nonsense; the figures (time to first token, tokens per second) are this machine's real ones. The flow itself,
:func:`chat_side_by_side`, is what tests/infer/test_serve_web.py checks. Needs Debian's chromium and
chromium-driver (apt-get install chromium chromium-driver) and the dev dependencies (selenium).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Headless, and nothing that reaches the network (without these, Chromium stalls where there is none).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]
PROMPT = "Who goes there? Speak, and tell me what news."


def browser_missing() -> str | None:
    """Why the flow cannot run here (no Chromium, no chromedriver, no selenium), or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (uv sync installs the dev dependencies)"
    return None


def open_browser(profile: str | Path, width: int = 1360, height: int = 860):
    """Headless Chromium under Debian's chromedriver, with a fresh profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={profile}", f"--window-size={width},{height}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=DriverService(executable_path=CHROMEDRIVER), options=options)


def _number(text: str) -> float | None:
    return None if text.strip() in ("", "–") else float(text)


def chat_side_by_side(driver, url: str, prompt: str = PROMPT, models: tuple[str, str] | None = None,
                      max_tokens: int = 48, temperature: float = 0.8, seed: int | None = 7,
                      timeout: float = 180) -> list[dict]:
    """Open the web chat at ``url``, choose ``models`` (default: the page's), set the sampling, type ``prompt``
    once and press Enter; when both answers have finished, what each pane shows: its model, its state ("done"
    or "error"), the answer's text, and the figures (ttft_ms, tokens, tps, total_ms; None where it shows "–")."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    for i, name in enumerate(models or ()):
        Select(driver.find_element(By.ID, f"model-{i}")).select_by_value(name)
    for field, value in (("max-tokens", max_tokens), ("temperature", temperature), ("seed", seed)):
        box = driver.find_element(By.ID, field)
        box.clear()
        if value is not None:
            box.send_keys(str(value))
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(prompt)
    box.send_keys(Keys.ENTER)
    panes = [driver.find_element(By.ID, f"pane-{i}") for i in (0, 1)]
    wait.until(lambda d: all(p.get_attribute("data-state") in ("done", "error") for p in panes))
    shown = []
    for i, pane in enumerate(panes):
        figure = {name: _number(pane.find_element(By.CLASS_NAME, name).text)
                  for name in ("ttft", "tokens", "tps", "total")}
        answers = pane.find_elements(By.CSS_SELECTOR, ".msg.assistant, .msg.error")
        shown.append({"model": Select(driver.find_element(By.ID, f"model-{i}")).first_selected_option.text,
                      "state": pane.get_attribute("data-state"),
                      "text": answers[-1].get_property("textContent") if answers else "",
                      "ttft_ms": figure["ttft"], "tokens": int(figure["tokens"]), "tps": figure["tps"],
                      "total_ms": figure["total"]})
    return shown


def _random_checkpoints(root: Path) -> list[Path]:
    """Standard and hybrid checkpoints of the cpu preset's shape, random weights, one tokenizer."""
    import torch

    from hybrid_gpt.checkpoint import save_checkpoint
    from hybrid_gpt.data.corpus import load_shakespeare
    from hybrid_gpt.data.tokenizer import Tokenizer
    from hybrid_gpt.model.gpt import GPT, GPTConfig
    from hybrid_gpt.presets import get_preset

    cpu = get_preset("cpu")
    tok = Tokenizer.train((d.text for d in load_shakespeare().train), vocab_size=cpu["vocab_size"])
    paths = []
    for name, layers in (("standard", "AAAA"), ("hybrid", "AAMM")):
        torch.manual_seed(0)
        config = GPTConfig(vocab_size=tok.vocab_size, block_size=cpu["block_size"], n_embd=cpu["n_embd"],
                           n_head=cpu["n_head"], layers=layers)
        paths.append(root / name)
        save_checkpoint(paths[-1], GPT(config), tok, {"stage": "random"})
    return paths


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("docs/serve-web-chat.png")
    missing = browser_missing()
    if missing:
        print(f"cannot take the screenshot: {missing}", file=sys.stderr)
        return 2
    from hybrid_gpt.infer.serve import Service, load_models

    with tempfile.TemporaryDirectory() as tmp:
        ckpts = argv[1:3] if len(argv) >= 3 else _random_checkpoints(Path(tmp))
        service = Service(load_models(ckpts), port=0, log_level="warning").start()
        driver = open_browser(Path(tmp) / "profile")
        try:
            shown = chat_side_by_side(driver, service.url)
            driver.save_screenshot(str(out))
        finally:
            driver.quit()
            service.stop()
    for pane in shown:
        print(f"{pane['model']}: {pane['state']}, TTFT {pane['ttft_ms']} ms, {pane['tokens']} tokens, "
              f"{pane['tps']} tok/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
