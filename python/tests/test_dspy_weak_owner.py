"""``WeakOwner``: a scripted LM's engine reads its LM through it, without keeping it alive."""

from __future__ import annotations

import copy
import gc

import pytest

from snakepool_worker.dspy.dummy import WeakOwner


class FakeLM:
    answers = {"q": {"answer": "a"}}

    def __init__(self) -> None:
        self.follow_examples = False
        self.engine = WeakOwner(self)

    def format(self) -> str:
        return "formatted"


def test_it_forwards_every_name_but_its_own_to_the_lm() -> None:
    lm = FakeLM()
    owner = lm.engine
    assert owner.follow_examples is False and owner.answers is FakeLM.answers
    assert owner.format() == "formatted"
    lm.follow_examples = True
    assert owner.follow_examples is True
    with pytest.raises(AttributeError, match="'FakeLM' object has no attribute 'missing'"):
        owner.missing
    assert type(owner) is WeakOwner and owner.__class__ is WeakOwner


def test_a_deep_copy_of_the_lm_gets_an_owner_of_the_copy() -> None:
    lm = FakeLM()
    copied = copy.deepcopy(lm)
    assert type(copied.engine) is WeakOwner
    copied.follow_examples = True
    assert copied.engine.follow_examples is True and lm.engine.follow_examples is False


def test_it_does_not_keep_the_lm_alive() -> None:
    owner = FakeLM().engine
    gc.collect()
    with pytest.raises(ReferenceError):
        owner.answers
