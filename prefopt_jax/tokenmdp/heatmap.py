"""Token-level heatmaps of implicit rewards: self-contained HTML and a matplotlib figure.

Each token string is coloured by its value on a diverging scale centred at 0: red for negative,
white for 0, blue for positive, saturating at ``+-vmax`` (default: the largest absolute value).
Rows are sequences; values at index ``t`` belong to token ``t`` (``tokenmdp.implicit`` alignment).

Shape suffixes: ``t`` token positions.
"""

import html

import numpy as np

# Diverging end points (RdBu-like): negative, zero, positive.
_NEG_RGB = np.array([178, 24, 43], dtype=np.float64)
_MID_RGB = np.array([247, 247, 247], dtype=np.float64)
_POS_RGB = np.array([33, 102, 172], dtype=np.float64)


def _rows(tokens, values_t):
    """Normalises one sequence or a list of them to ``[(tokens, values_t), ...]``."""
    if tokens and isinstance(tokens[0], str):
        tokens, values_t = [tokens], [values_t]
    rows = []
    for row_tokens, row_values_t in zip(tokens, values_t, strict=True):
        row_values_t = np.asarray(row_values_t, dtype=np.float64).reshape(-1)
        if len(row_tokens) != row_values_t.shape[0]:
            raise ValueError(f"{len(row_tokens)} tokens but {row_values_t.shape[0]} values")
        rows.append((list(row_tokens), row_values_t))
    return rows


def _scale(rows, vmax):
    """The saturation value: ``vmax`` or the largest absolute value (1 when all are 0)."""
    if vmax is not None:
        return float(vmax)
    peak = max((float(np.max(np.abs(v))) for _, v in rows if v.size), default=0.0)
    return peak if peak > 0 else 1.0


def value_to_rgb(value, vmax):
    """The diverging colour of ``value`` as an ``(r, g, b)`` tuple of ints in 0..255."""
    frac = float(np.clip(value / vmax, -1.0, 1.0))
    end = _POS_RGB if frac >= 0 else _NEG_RGB
    rgb = _MID_RGB + abs(frac) * (end - _MID_RGB)
    return tuple(int(round(c)) for c in rgb)


def _token_span(token, value, vmax):
    """One ``<span>`` for a token: background by value, the value in the hover title."""
    r, g, b = value_to_rgb(value, vmax)
    # Dark backgrounds need light text to stay readable.
    ink = "#fff" if 0.299 * r + 0.587 * g + 0.114 * b < 128 else "#000"
    # Whitespace-only tokens would vanish: show spaces and newlines as visible marks.
    shown = token.replace(" ", "\u00b7").replace("\n", "\u21b5")
    return (f'<span class="tok" style="background:rgb({r},{g},{b});color:{ink}" '
            f'title="{value:+.4f}">{html.escape(shown)}</span>')


def render_html(tokens, values_t, *, vmax=None, title=None, labels=None):
    """Self-contained HTML page with tokens coloured by value (one line per sequence).

    Args:
      tokens: a list of token strings, or a list of such lists (one per sequence).
      values_t: the values aligned with ``tokens`` (one array, or one per sequence).
      vmax: the absolute value at which colours saturate; default the largest ``|value|``.
      title: optional heading.
      labels: optional label per sequence, shown before it with the sequence's total.
    Returns:
      The HTML document as a string (inline CSS, no scripts, no external resources).
    """
    rows = _rows(tokens, values_t)
    scale = _scale(rows, vmax)
    lines = []
    for i, (row_tokens, row_values_t) in enumerate(rows):
        spans = "".join(_token_span(tok, val, scale) for tok, val in zip(row_tokens, row_values_t))
        label = "" if labels is None else html.escape(str(labels[i])) + " "
        total = f"{row_values_t.sum():+.3f}"
        lines.append(f'<div class="row"><span class="lab">{label}[{total}]</span> {spans}</div>')
    legend = " ".join(_token_span(f"{v:+.2g}", v, scale) for v in np.linspace(-scale, scale, 5))
    head = f"<h3>{html.escape(title)}</h3>" if title else ""
    return (
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><style>"
        "body{font-family:monospace;font-size:14px}"
        ".tok{padding:1px 2px;margin:0 1px;border-radius:2px;white-space:pre}"
        ".row{margin:6px 0;line-height:1.9}.lab{color:#555}"
        f"</style></head><body>{head}{''.join(lines)}"
        f'<div class="row"><span class="lab">scale</span> {legend}</div></body></html>')


def plot_heatmap(tokens, values_t, *, vmax=None, title=None, tokens_per_line=16):
    """A matplotlib Figure (Agg canvas, no pyplot state) of tokens in cells coloured by value.

    Each sequence is wrapped into lines of ``tokens_per_line`` cells; arguments as in
    ``render_html``. Returns the ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rows = _rows(tokens, values_t)
    scale = _scale(rows, vmax)
    grid_values, grid_tokens = _wrap(rows, tokens_per_line)
    num_lines, width = grid_values.shape
    fig = Figure(figsize=(max(4.0, 0.9 * width), 0.5 * num_lines + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ramp = [np.array(value_to_rgb(v, 1.0)) / 255.0 for v in np.linspace(-1.0, 1.0, 257)]
    image = ax.imshow(np.ma.masked_invalid(grid_values), cmap=ListedColormap(ramp),
                      vmin=-scale, vmax=scale, aspect="auto")
    for (i, j), token in np.ndenumerate(grid_tokens):
        if token is not None:
            ax.text(j, i, token.replace("\n", "\u21b5"), ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01)
    return fig


def _wrap(rows, tokens_per_line):
    """Lays sequences out in a grid, each starting on a new line; empty cells are nan/None."""
    lines = []
    for row_tokens, row_values_t in rows:
        for start in range(0, max(len(row_tokens), 1), tokens_per_line):
            lines.append((row_tokens[start:start + tokens_per_line],
                          row_values_t[start:start + tokens_per_line]))
    width = max(1, max(len(toks) for toks, _ in lines))
    grid_values = np.full((len(lines), width), np.nan)
    grid_tokens = np.full((len(lines), width), None, dtype=object)
    for i, (toks, vals) in enumerate(lines):
        grid_values[i, :len(toks)] = vals
        grid_tokens[i, :len(toks)] = toks
    return grid_values, grid_tokens


def masked_rows(token_ids_bt, values_bt, mask_bt, id_to_str):
    """Token strings and values of the real (mask 1) positions of each row, for the renderers.

    ``id_to_str`` maps one token id to its string (e.g. a tokenizer's decode of ``[id]``).
    """
    token_ids_bt, values_bt = np.asarray(token_ids_bt), np.asarray(values_bt, dtype=np.float64)
    keep_bt = np.asarray(mask_bt) > 0
    tokens = [[id_to_str(int(i)) for i in ids[keep]] for ids, keep in zip(token_ids_bt, keep_bt)]
    values = [vals[keep] for vals, keep in zip(values_bt, keep_bt)]
    return tokens, values
