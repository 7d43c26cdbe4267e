"""Bad rows: a clear error naming the row and field by default; skipped and counted on request."""

import pytest

from prefopt_jax.data import DataConfig, DataError, prepare


def good(i):
    return {"prompt": f"question {i}", "chosen": " good answer", "rejected": " bad answer"}


def chat_good(i):
    return {"prompt": [{"role": "user", "content": f"question {i}"}],
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}


def with_bad(row, at=3, n=6, make=good):
    rows = [make(i) for i in range(n)]
    rows[at] = row
    return rows


CASES = {
    "missing field": (with_bad({"prompt": "q", "chosen": " a"}), "rejected", "missing field"),
    "wrong type": (with_bad({"prompt": "q", "chosen": 5, "rejected": " b"}), "chosen",
                   "wrong type"),
    "wrong label type": ([{"prompt": "q", "completion": " a", "label": True}] * 3
                         + [{"prompt": "q", "completion": " a", "label": "yes"}], "label",
                         "wrong type"),
    "wrong score type": ([{"prompt": "q", "completions": [" a", " b"], "scores": [1, 2]}] * 3
                         + [{"prompt": "q", "completions": [" a", " b"], "scores": [1, "x"]}],
                         "scores[1]", "wrong type"),
    "empty completion": (with_bad({"prompt": "q", "chosen": "  ", "rejected": " b"}), "chosen",
                         "empty completion"),
    "empty chat completion": (with_bad({"prompt": [{"role": "user", "content": "q"}],
                                        "chosen": [{"role": "assistant", "content": ""}],
                                        "rejected": [{"role": "assistant", "content": "b"}]},
                                       make=chat_good), "chosen", "empty completion"),
    "identical": (with_bad({"prompt": "q", "chosen": " same", "rejected": " same"}), "rejected",
                  "chosen identical to rejected"),
    "mixed formats (unpaired row)": (with_bad({"prompt": "q", "completion": " a", "label": True}),
                                     "chosen", "mixed formats"),
    "mixed formats (chat row)": (with_bad(chat_good(3)), "prompt", "mixed formats"),
    "mixed formats (implicit row)": (with_bad({"chosen": "q a", "rejected": "q b"}), "prompt",
                                     "mixed formats"),
    "unknown role": (with_bad({"prompt": [{"role": "robot", "content": "q"}],
                               "chosen": [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "assistant", "content": "b"}]},
                              make=chat_good), "prompt[0].role", "unknown role 'robot'"),
    "prompt too long": (with_bad({"prompt": "q " * 200, "chosen": " a", "rejected": " b"}),
                        "prompt", "longer than the limit"),
}
LIMITS = {"max_prompt_length": 64}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_row_raises_naming_row_and_field(tok, name):
    rows, field, reason = CASES[name]
    at = len(rows) - 1 if len(rows) == 4 else 3
    with pytest.raises(DataError) as info:
        prepare(rows, tok, DataConfig(cache_dir=None, **LIMITS))
    message = str(info.value)
    assert f"row {at}" in message and f"field '{field}'" in message and reason in message
    assert (info.value.row, info.value.field) == (at, field)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_row_skipped_on_request_and_counted(tok, name):
    rows, field, reason = CASES[name]
    at = len(rows) - 1 if len(rows) == 4 else 3
    data, report = prepare(rows, tok, DataConfig(cache_dir=None, **LIMITS,
                                                 skip_bad_rows=True))
    assert report.counts["rows_skipped"] == 1
    assert report.skipped[0][:2] == (at, field) and reason in report.skipped[0][2]
    assert at not in data.example_index_n.tolist() and len(data) == len(rows) - 1
    assert f"row {at}" in report.summary()


def test_row_index_is_global_on_a_second_host(tok):
    rows = with_bad({"prompt": "q", "chosen": " a"}, at=7, n=10)
    prepare(rows, tok, DataConfig(cache_dir=None), process_index=0, process_count=2)
    with pytest.raises(DataError, match="row 7, field 'rejected'"):
        prepare(rows, tok, DataConfig(cache_dir=None), process_index=1, process_count=2)


def test_invalid_json_line_names_the_row(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a",\n')
    with pytest.raises(DataError, match="d.jsonl line 2: invalid JSON"):
        prepare(str(path), tok, DataConfig(cache_dir=None))


def test_unknown_format_names_the_columns(tok):
    with pytest.raises(DataError, match=r"no known format in columns \['answer', 'question'\]"):
        prepare([{"question": "a", "answer": "b"}], tok, DataConfig(cache_dir=None))


def test_every_row_bad_is_an_error_even_when_skipping(tok):
    rows = [{"prompt": "q", "chosen": " a", "rejected": " a"}] * 3
    with pytest.raises(ValueError, match="no examples left"):
        prepare(rows, tok, DataConfig(cache_dir=None, skip_bad_rows=True))
