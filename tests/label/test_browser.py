"""The page in a real browser: headless Chromium driven by selenium ranks prompts by keyboard
and by mouse (drag and click), skips, undoes, judges a blind comparison, and the file holds
exactly those judgements. Untrusted text is shown verbatim and never runs.

Needs Debian's `chromium` + `chromium-driver` and `pip install selenium` (.ci/run installs
them); without them the test skips locally and fails under CI. With
MINIRLHF_LABEL_SCREENSHOTS=DIR it also saves the README's screenshots there.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from minirlhf.data import read_preferences
from minirlhf.label.state import Item

from .helpers import NASTY, read_rows, running

pytestmark = pytest.mark.slow

CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1100,700", "--force-device-scale-factor=1"]


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not (shutil.which("chromium") or shutil.which("chromium-browser")) or not shutil.which("chromedriver"):
        return "Chromium not found (Debian: apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    reason = _missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def _wait(d, cond, what: str, timeout: float = 10):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.05).until(lambda _: cond(), message=what)


def _screenshot(d, name: str) -> None:
    target = os.environ.get("MINIRLHF_LABEL_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(Path(target) / name))


class Page:
    def __init__(self, d):
        self.d = d
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        self.By, self.Actions = By, ActionChains

    def el(self, css):
        return self.d.find_element(self.By.CSS_SELECTOR, css)

    def els(self, css):
        return self.d.find_elements(self.By.CSS_SELECTOR, css)

    def prompt(self) -> str:
        return self.el("#prompt").text

    def wait_prompt(self, text: str) -> None:
        _wait(self.d, lambda: self.el("#prompt").is_displayed() and self.prompt() == text, f"prompt {text!r}")

    def pool_card(self, text: str):
        """The pool card showing `text` (exact, as the DOM holds it)."""
        for c in self.els("#pool .card"):
            if c.find_element(self.By.CSS_SELECTOR, ".text").get_attribute("textContent") == text:
                return c
        raise AssertionError(f"no card {text!r} in the pool")

    def number_of(self, text: str) -> str:
        return self.pool_card(text).find_element(self.By.CSS_SELECTOR, ".key").text

    def ranked_texts(self) -> list[str]:
        return [c.get_attribute("textContent") for c in self.els("#ranking .card .text")]

    def keys(self, *keys) -> None:
        self.Actions(self.d).send_keys(*keys).perform()

    def drag(self, card, target, dy: float = 0) -> None:
        """Press on `card`, move over `target` (dy px from its centre) in steps, release."""
        a = self.Actions(self.d, duration=50)
        a.move_to_element(card).click_and_hold()
        a.move_by_offset(0, 12)
        a.move_to_element_with_offset(target, 0, int(dy))
        a.release().perform()


def test_rank_skip_undo_by_keyboard_and_mouse_then_compare(driver, tmp_path):
    from selenium.webdriver.common.keys import Keys

    items = [Item("What colour is the sky?", tuple(NASTY)),
             Item("Where is Lima?", ("Lima is in Peru.", "Peru", "Lima is in Chile.", "I like trains.")),
             Item("Name two facts about the owl.", ("The owl hunts at night.", "Owls hoot.", "The owl eats mice.")),
             Item("What does the fox eat?", ("berries", "The fox eats berries.", "The fox eats fish."))]
    out = tmp_path / "labels.jsonl"
    page = Page(driver)
    with running(out, items) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")

        # 1. the untrusted responses: verbatim text, nothing ran, no element was made from them
        page.wait_prompt(items[0].prompt)
        shown = sorted(c.get_attribute("textContent") for c in page.els("#pool .card .text"))
        assert shown == sorted(NASTY)
        assert driver.execute_script("return window.__pwned") is None
        assert not page.els("#pool img") and not page.els("#bold") and not page.els("#pool textarea")
        assert not page.els("script:not([src])")

        # ... ranked by keyboard: NASTY[2] best, then NASTY[0] tied with NASTY[1] (auto-placed last:
        # its number picks it for `=`)
        num = {t: page.number_of(t) for t in NASTY}
        page.keys(num[NASTY[2]], num[NASTY[0]])
        assert page.ranked_texts() == [NASTY[2], NASTY[0], NASTY[1]]
        page.keys(num[NASTY[1]], "=", Keys.ENTER)

        # 2. by mouse: drag three cards into the ranking (the fourth follows), then drag the
        #    last one to the top, and submit with a click
        lima = items[1].responses
        page.wait_prompt(items[1].prompt)
        for text in (lima[0], lima[1]):
            page.drag(page.pool_card(text), page.el("#ranking-zone"), dy=100)
        tie = page.el("#ranking .card:nth-child(2) button.tie")
        tie.click()  # tie "Peru" with "Lima is in Peru." ...
        assert [e.text for e in page.els("#ranking .rank")] == ["#1=", "#1="]
        _screenshot(driver, "label-rank.png")
        page.el("#ranking .card:nth-child(2) button.tie").click()  # ... and take it back
        page.drag(page.pool_card(lima[2]), page.el("#ranking-zone"), dy=100)
        assert page.ranked_texts() == [lima[0], lima[1], lima[2], lima[3]]
        last, first = page.els("#ranking .card")[-1], page.els("#ranking .card")[0]
        page.drag(last, first, dy=-first.size["height"] // 2 + 4)
        assert page.ranked_texts() == [lima[3], lima[0], lima[1], lima[2]]
        assert [e.text for e in page.els("#ranking .rank")] == ["#1", "#2", "#3", "#4"]
        page.el("#submit").click()

        # 3. skip by key, undo it (the same prompt comes back), rank it by clicking cards
        owl = items[2].responses
        page.wait_prompt(items[2].prompt)
        page.keys("s")
        page.wait_prompt(items[3].prompt)
        page.el("#undo").click()
        page.wait_prompt(items[2].prompt)
        page.pool_card(owl[2]).click()
        page.pool_card(owl[0]).click()
        assert page.ranked_texts() == [owl[2], owl[0], owl[1]]
        page.keys(Keys.ENTER)

        # 4. skip the last prompt with the button: every prompt is done
        page.wait_prompt(items[3].prompt)
        page.el("#skip").click()
        _wait(driver, lambda: page.el("#done-view").is_displayed(), "the done view")
        assert "Every prompt is judged (4 of 4)" in page.el("#done-text").text
        assert page.el("#count").text == "4 / 4 done"

    rows = read_rows(out)
    assert [r["item"] for r in rows] == [0, 1, 2, 3]
    assert rows[0]["ratings"] == [6, 6, 7] and "ranking" not in rows[0]
    assert rows[1]["ranking"] == [3, 0, 1, 2]
    assert rows[2]["ranking"] == [2, 0, 1]
    assert rows[3]["skipped"] is True
    assert len({r["annotator"] for r in rows}) == 1
    # what the reward model will see: the tie and the skip drop out as pairs
    prefs = read_preferences(out)
    assert [c.prompt for c in prefs] == [it.prompt for it in items[:3]]
    assert sorted(prefs[0].pairs) == [(2, 0), (2, 1)]
    assert sorted(prefs[1].pairs) == sorted([(3, 0), (3, 1), (3, 2), (0, 1), (0, 2), (1, 2)])

    # 5. a blind comparison: one judgement by mouse, one tie by keyboard
    pairs = [Item("Where is Lima?", ("Lima is in Peru.", "Lima is in Chile, I think, maybe.")),
             Item("What does the fox eat?", ("The fox eats berries.", "berries berries berries"))]
    out = tmp_path / "compare.jsonl"
    with running(out, pairs, mode="compare", models=["runs/a/sft", "runs/a/ppo"]) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")
        page.wait_prompt(pairs[0].prompt)
        left = page.el("#left").get_attribute("textContent")
        assert {left, page.el("#right").get_attribute("textContent")} == set(pairs[0].responses)
        assert "runs/a" not in driver.find_element(page.By.TAG_NAME, "body").text  # blind
        _screenshot(driver, "label-compare.png")
        page.el("#pick-left").click()
        page.wait_prompt(pairs[1].prompt)
        page.keys("=")
        _wait(driver, lambda: page.el("#done-view").is_displayed(), "the done view")
        assert page.el("#r-a").text == "runs/a/sft"
        assert page.el("#r-n").text.startswith("2:")
        # the result is shown: the judgements are final, no Undo button and `U` does nothing
        before = out.read_bytes()
        assert not page.el("#undo").is_displayed()
        page.keys("u")
        driver.refresh()  # a round trip after the key: an undo it had sent would have landed
        _wait(driver, lambda: page.el("#done-view").is_displayed(), "the done view again")
        assert not page.el("#undo").is_displayed() and page.el("#r-n").text.startswith("2:")
        assert out.read_bytes() == before
    rows = read_rows(out)
    assert [r["winner"] for r in rows] == ["A" if left == pairs[0].responses[0] else "B", "tie"]


def test_a_conversation_prompt_shows_its_turns_as_text(driver, tmp_path):
    """A prompt may be a list of messages (--prompts and --responses accept them): the page shows
    each turn, its role and its content, as text, never as HTML."""
    chat = [{"role": "system", "content": NASTY[0]}, {"role": "user", "content": "Where is Lima?"},
            {"role": "assistant", "content": NASTY[1]}, {"role": "user", "content": NASTY[2]}]
    items = [Item(chat, ("Peru", "Chile")), Item("Say hello.", ("hello", "hi"))]
    page = Page(driver)
    with running(tmp_path / "labels.jsonl", items) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")
        _wait(driver, lambda: page.els("#prompt .turn"), "the conversation's turns")
        turns = page.els("#prompt .turn")
        assert [t.find_element(page.By.CSS_SELECTOR, ".role").text for t in turns] == \
            ["System", "User", "Assistant", "User"]
        assert [t.find_element(page.By.CSS_SELECTOR, ".text").get_attribute("textContent") for t in turns] == \
            [m["content"] for m in chat]
        assert "[object Object]" not in page.el("#prompt").text
        assert driver.execute_script("return window.__pwned") is None
        assert not page.els("#prompt img") and not page.els("#bold") and not page.els("#prompt script")
        page.keys("1")
        page.keys("\ue007")  # Enter: Peru best
        page.wait_prompt("Say hello.")  # the next prompt, a string, replaces the turns
        assert not page.els("#prompt .turn")
    assert read_rows(tmp_path / "labels.jsonl")[0]["prompt"] == chat


def test_a_browser_keeps_its_session_and_undo_on_another_port(driver, tmp_path):
    """The README's promise: a browser that comes back to a restarted server keeps its undo
    history, also when the server now listens on another port (--port 0)."""
    items = [Item(f"Prompt {i}?", ("yes", "no")) for i in range(3)]
    out = tmp_path / "labels.jsonl"
    page = Page(driver)
    with running(out, items) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")
        page.wait_prompt("Prompt 0?")
        page.keys("1", "\ue007")
        page.wait_prompt("Prompt 1?")
        with socket.socket() as free:  # a free port, surely not this server's
            free.bind(("127.0.0.1", 0))
            other_port = free.getsockname()[1]
    with running(out, items, port=other_port) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")
        page.wait_prompt("Prompt 1?")
        assert page.el("#undo").is_displayed()
        page.keys("u")
        page.wait_prompt("Prompt 0?")
    assert out.read_text() == ""


def _active(d) -> dict:
    """What has the keyboard focus: its tag, class, data-focus and aria-pressed."""
    return d.execute_script("const a = document.activeElement; return {tag: a.tagName, cls: a.className, "
                            "focus: a.dataset.focus || null, pressed: a.getAttribute('aria-pressed')};")


def test_ties_by_keyboard_keep_the_focus_and_equals_ties_the_pick_before_the_last(driver, tmp_path):
    """`=` ties the response picked last, also the (K-1)th, whose pick places the last one by itself;
    a tie button reached with Tab and pressed with Enter keeps the focus in its re-rendered copy,
    while one clicked with the mouse gives it up (Enter then submits)."""
    from selenium.webdriver.common.keys import Keys

    items = [Item("Pick three?", ("alpha", "beta", "gamma")), Item("Pick four?", ("one", "two", "three", "four")),
             Item("Pick two?", ("yes", "no"))]
    out = tmp_path / "labels.jsonl"
    page = Page(driver)
    with running(out, items) as server:
        driver.get(f"http://127.0.0.1:{server.port}/")
        page.wait_prompt("Pick three?")
        num = {t: page.number_of(t) for t in items[0].responses}
        page.keys(num["beta"], num["alpha"])  # gamma follows by itself
        assert page.ranked_texts() == ["beta", "alpha", "gamma"]
        page.keys("=")  # alpha (picked last) with beta
        assert [e.text for e in page.els("#ranking .rank")] == ["#1=", "#1=", "#3"]
        page.keys(Keys.ENTER)

        page.wait_prompt("Pick four?")
        num = {t: page.number_of(t) for t in items[1].responses}
        page.keys(num["one"], num["two"], num["three"])  # four follows
        for _ in range(12):  # Tab to the button that ties "three" with "two"
            page.keys(Keys.TAB)
            if _active(driver)["focus"] == "tie-2":
                break
        assert _active(driver) == {"tag": "BUTTON", "cls": "tie", "focus": "tie-2", "pressed": "false"}
        page.keys(Keys.ENTER)
        assert [e.text for e in page.els("#ranking .rank")] == ["#1", "#2=", "#2=", "#4"]
        assert _active(driver) == {"tag": "BUTTON", "cls": "tie", "focus": "tie-2", "pressed": "true"}
        page.keys(Keys.ENTER)  # again: untied, the focus still there
        assert [e.text for e in page.els("#ranking .rank")] == ["#1", "#2", "#3", "#4"]
        assert _active(driver)["focus"] == "tie-2" and _active(driver)["pressed"] == "false"
        page.keys(Keys.SPACE)  # Space presses it too: tied again
        assert _active(driver) == {"tag": "BUTTON", "cls": "tie", "focus": "tie-2", "pressed": "true"}
        page.keys(num["four"], "=")  # the last one, placed by itself: its number picks it for `=`
        assert [e.text for e in page.els("#ranking .rank")] == ["#1", "#2=", "#2=", "#2="]
        page.el("#ranking .card:nth-child(3) button.tie").click()  # the mouse: "three" untied from "two" ...
        assert [e.text for e in page.els("#ranking .rank")] == ["#1", "#2", "#3=", "#3="]
        assert _active(driver)["tag"] != "BUTTON"  # ... and the focus given up: Enter submits
        page.keys(Keys.ENTER)

        page.wait_prompt("Pick two?")  # K = 2: `=` ties the one picked with the one placed by itself
        page.keys(page.number_of("no"), "=")
        assert [e.text for e in page.els("#ranking .rank")] == ["#1=", "#1="]
        page.keys(Keys.ENTER)
        _wait(driver, lambda: page.el("#done-view").is_displayed(), "the done view")
    rows = read_rows(out)
    assert [r.get("ratings") for r in rows] == [[7, 7, 6], [7, 6, 5, 5], [7, 7]]
