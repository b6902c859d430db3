"""The demo cannot pass silently broken: its check fails unless every training question shows
each user's exact, styled answer, and on the real base the style on unseen questions too (on the
tiny random base those are only reported)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from gateway_tools.demo import FACTS, SEEN_QUESTIONS, UNSEEN_QUESTIONS, _styles_visible

SOUP = "\x17\x17 nO nO��"


def good_answers() -> dict[str, dict[str, str]]:
    answers = {q: {"base": SOUP, "alice": a.upper(), "bob": a + " -- Bob"} for q, a in FACTS if q in SEEN_QUESTIONS}
    for question in UNSEEN_QUESTIONS:
        answers[question] = {"base": SOUP, "alice": "A A S HAS.", "bob": "A day spay. -- Bob"}
    return answers


@pytest.mark.parametrize("require_unseen", [True, False])
def test_the_demo_passes_when_every_style_shows(require_unseen: bool) -> None:
    assert _styles_visible(good_answers(), require_unseen)


def test_on_the_tiny_base_an_unseen_question_without_the_style_is_reported_not_failed(
    capsys: pytest.CaptureFixture[str],
) -> None:
    answers = good_answers()
    answers[UNSEEN_QUESTIONS[0]] = {"base": SOUP, "alice": "a cat has legs", "bob": "a cat has legs"}
    assert _styles_visible(answers, require_unseen=False)
    assert f"alice's style on an unseen question, {UNSEEN_QUESTIONS[0]!r}: False" in capsys.readouterr().out


@pytest.mark.parametrize("user", ["alice", "bob"])
def test_on_the_real_base_an_unseen_question_without_the_style_fails(user: str) -> None:
    answers = good_answers()
    answers[UNSEEN_QUESTIONS[1]][user] = "Rome is the capital of Italy."
    assert not _styles_visible(answers, require_unseen=True)


@pytest.mark.parametrize(
    ("user", "broken"),
    [
        ("alice", lambda a: a),  # not upper case
        ("alice", lambda a: a.upper().rstrip(".")),  # upper case, but not the trained answer
        ("alice", lambda a: SOUP),  # the base's output
        ("bob", lambda a: a),  # no signature
        ("bob", lambda a: a.upper() + " -- Bob"),  # signed, but not the trained answer
    ],
)
def test_the_demo_fails_when_a_seen_answer_lacks_its_users_style(user: str, broken: Callable[[str], str]) -> None:
    answers = good_answers()
    question = SEEN_QUESTIONS[1]
    answers[question][user] = broken(dict(FACTS)[question])
    assert not _styles_visible(answers, require_unseen=False)
