"""Reward functions in TRL's convention: built-ins, functions named 'package.module:function',
weights, None as "no opinion", and failures that name the function and the prompt."""

import sys
import types

import numpy as np
import pytest

from prefopt_jax.errors import ConfigError, UserError
from prefopt_jax.rewards.functions import RewardFunctionError, RewardFunctions, resolve


@pytest.fixture
def user_module(monkeypatch):
    """A module of the user's own reward functions, importable as `my_rewards`."""
    module = types.ModuleType("my_rewards")

    def long_is_good(prompts, completions, **_):
        return [len(c) / 10 for c in completions]

    def picky(prompts, completions, answer, **_):
        return [None if a == "skip" else 2.0 for a in answer]

    def fragile(prompts, completions, **_):
        return [1.0 / (len(c) - 3) for c in completions]  # fails on a 3-character completion

    module.long_is_good, module.picky, module.fragile = long_is_good, picky, fragile
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    return module


def test_math_answer_reads_the_boxed_or_final_answer():
    rf = RewardFunctions(["math_answer"])
    completions = ["So it is \\boxed{42}.", "40 + 2 = 42", "I get \\boxed{\\frac{84}{2}}",
                   "It is 41.", "no idea", "\\boxed{7}"]
    answers = ["42", "42", "42", "42", "42", None]
    got = rf(["q"] * 6, completions, {"answer": answers})
    np.testing.assert_array_equal(got.columns_nm[:, 0], [1, 1, 1, 0, 0, np.nan])
    assert got.metrics()["reward/math_answer"] == pytest.approx(0.6)


def test_weights_sum_the_opinions_and_none_abstains(user_module):
    rf = RewardFunctions(["my_rewards:long_is_good", "my_rewards:picky", "exact_match"],
                         weights=[1.0, 0.5, 3.0])
    got = rf(["a", "b", "c"], ["12345", "xy", "ok"], {"answer": ["skip", "z", "ok"]})
    # row 0: 0.5 + (picky abstains) + 3*0; row 1: 0.2 + 0.5*2 + 0; row 2: 0.2 + 1 + 3
    np.testing.assert_allclose(got.total_n, [0.5, 1.2, 4.2])
    assert np.isnan(got.columns_nm[0, 1])
    assert got.names == ("my_rewards:long_is_good", "my_rewards:picky", "exact_match")
    nobody = RewardFunctions(["my_rewards:picky"])(["a"], ["b"], {"answer": ["skip"]})
    assert np.isnan(nobody.total_n[0])  # no opinion at all: no reward


def test_format_and_length_builtins():
    fmt = RewardFunctions(["think_format", ("regex", {"pattern": r"\d+$"}),
                           ("length_penalty", {"max_chars": 20})])
    got = fmt(["q", "q"], ["<think>hm</think> 12", "just 12 and some more words"])
    # 20 characters: no penalty; 27 characters: -(27 - 20) / 20
    np.testing.assert_allclose(got.columns_nm, [[1.0, 1.0, 0.0], [0.0, 0.0, -0.35]])


def test_builtins_read_trls_conversational_completions_as_their_text():
    """A conversational prompt's completions come as `[{"role": "assistant", "content": ...}]`
    (TRL's form); every built-in scores them as it scores the text."""
    specs = ["math_answer", "exact_match", "sentiment", "think_format",
             ("regex", {"pattern": r"\d+$"}), ("share", {"pattern": "[0-9]+"}),
             ("length_penalty", {"max_chars": 12})]
    texts = ["<think>sum</think> \\boxed{12}", "12", "What a lovely, happy day 12",
             "I hate this 7", ""]
    chat = [[{"role": "assistant", "content": t}] for t in texts]
    fields = {"answer": ["12", "12", "3", "7", "1"]}
    rf = RewardFunctions(specs)
    as_text = rf(["q"] * 5, texts, fields).columns_nm
    as_chat = rf([[{"role": "user", "content": "q"}]] * 5, chat, fields).columns_nm
    np.testing.assert_array_equal(as_chat, as_text)
    assert as_text[:, 0].tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]  # math_answer read the text
    assert as_text[2, 2] > 0.5 and as_text[3, 2] < -0.3  # sentiment too


def test_trls_reward_functions_run_unchanged():
    """TRL calls reward functions by keyword and passes the completions' token ids:
    `def f(completions, **kwargs)` (TRL's own example) and `def f(completion_ids, **kwargs)`
    run as written; a function with other parameter names still gets them by position."""
    got = {}

    def reward_len(completions, **kwargs):
        got.update(kwargs)
        return [-abs(5 - len(c)) for c in completions]

    def by_ids(completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    tokens_bkc = np.array([[[5, 6, 0], [7, 0, 0]]])
    mask_bkc = np.array([[[1, 1, 0], [1, 0, 0]]])
    rf = RewardFunctions([reward_len, by_ids, lambda p, c, **_: [len(p[0])] * 2])
    out = rf(["pq", "pq"], ["abc", "abcdefg"], {"answer": ["1", "2"]},
             tokens=([[1]], tokens_bkc, mask_bkc))
    np.testing.assert_allclose(out.columns_nm, [[-2, 2, 2], [-2, 1, 2]])
    assert got == {"prompts": ["pq", "pq"], "answer": ["1", "2"], "completion_ids": [[5, 6], [7]]}


def test_failures_name_the_function_and_the_prompt(user_module):
    with pytest.raises(RewardFunctionError, match=r"reward function my_rewards:fragile failed "
                                                  r"on prompt 2: ZeroDivisionError"):
        RewardFunctions(["my_rewards:fragile"])(["a"] * 4, ["abcd", "abcde", "abc", "abcdef"])
    with pytest.raises(RewardFunctionError, match="returned 1 values for 2 completions"):
        RewardFunctions([lambda p, c, **_: [1.0]])(["a", "b"], ["x", "y"])
    with pytest.raises(RewardFunctionError, match="returned 'high' for prompt 0"):
        RewardFunctions([lambda p, c, **_: ["high"]])(["a"], ["x"])
    with pytest.raises(RewardFunctionError, match="math_answer failed on prompt 0: ValueError: "
                                                  "needs an 'answer' column"):
        RewardFunctions(["math_answer"])(["a"], ["x"])
    assert issubclass(RewardFunctionError, UserError)


def test_unknown_names_are_config_errors():
    with pytest.raises(ConfigError, match="unknown reward function 'math'; built in: "
                                          "exact_match, length_penalty, math_answer"):
        resolve("math")
    with pytest.raises(ConfigError, match="no_such_module"):
        resolve("no_such_module:fn")
    with pytest.raises(ConfigError, match="2 reward weights for 1 reward functions"):
        RewardFunctions(["sentiment"], weights=[1, 2])
