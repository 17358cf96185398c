"""notebooks/rollout_demo.ipynb: committed without outputs, and executed end to end by nbclient in an ipykernel on
the CPU with the shipped model (any cell error fails the test).

The executed notebook and a screenshot of it (its outputs, with the first lines of each cell, rendered to a plain
page and photographed by the headless Chromium of the browser test) are saved in the test's tmp folder; DECMEM_UPDATE_SCREENSHOTS=1 also writes
the screenshot to docs/images/notebook.png (the README's picture).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "rollout_demo.ipynb"


def test_committed_notebook_carries_no_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
    assert "widgets" not in nb.metadata  # no stored widget state either


def _as_html(nb, source_lines: int = 4) -> str:
    """The executed notebook as a plain page: markdown titles, the first `source_lines` lines of every code cell,
    and its text, image and HTML outputs (widgets as their saved state holds them: buttons, HTML, labels). The
    outputs of the first cell that rolls out get id="rollout" (where the screenshot starts)."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    models = [(v.get("model_name"), v.get("state", {})) for v in state.values()]
    widgets = "".join([f"<button>{html.escape(st.get('description', ''))}</button>" for m, st in models
                       if m == "ButtonModel"] +
                      [f"<div>{st.get('value', '')}</div>" for m, st in models if m == "HTMLModel"] +
                      [f"<div>{html.escape(st.get('value', ''))}</div>" for m, st in models if m == "LabelModel"])
    parts = ["<html><head><style>body { font: 13px sans-serif; margin: 12px } img { max-width: 100% } "
             "pre { font-size: 11px } pre.src { background: #f4f4f4; padding: 6px }</style></head><body>"]
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            title, _, rest = cell.source.partition("\n")
            parts.append(f"<h3>{html.escape(title.lstrip('# '))}</h3><p>{html.escape(rest)}</p>")
            continue
        lines = cell.source.splitlines()
        shown = "\n".join(lines[:source_lines]) + ("\n..." if len(lines) > source_lines else "")
        parts.append(f"<pre class='src'>{html.escape(shown)}</pre>")
        if "session.step(clip.actions" in cell.source:
            parts.append("<a id='rollout'></a>")
        for out in cell.outputs:
            data = out.get("data", {})
            if out.output_type == "stream":
                parts.append(f"<pre>{html.escape(out.text)}</pre>")
            elif "image/png" in data:
                parts.append(f"<img src='data:image/png;base64,{data['image/png']}'>")
            elif "text/html" in data:
                parts.append(data["text/html"])
            elif "application/vnd.jupyter.widget-view+json" in data:
                parts.append(widgets)
    return "\n".join(parts + ["</body></html>"])


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    nbformat.write(nb, tmp_path / "rollout_demo.executed.ipynb")

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"decmem_jax from {ROOT / 'decmem_jax'}" in text  # this checkout, not an installed copy
    assert "chunk 3:" in text and "memory bank: 9 latent frames" in text
    assert "skipped: not found" in text  # the real-weights cell skips itself here
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the retrieval / PSNR figure
    assert any("image/gif" in o.get("data", {}).get("text/html", "") for o in outputs)  # the inline video
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)  # the buttons
    widget_state = nb.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    labels = [v["state"].get("value", "") for v in widget_state.values() if v["model_name"] == "LabelModel"]
    assert any(label.startswith("forward: chunk 4 in") for label in labels), labels  # the press in the cell ran

    page = tmp_path / "notebook.html"
    page.write_text(_as_html(nb))
    from playwright.sync_api import sync_playwright

    from tests.test_play import launch_chromium, save_screenshot

    with sync_playwright() as pw:
        browser = launch_chromium(pw)
        view = browser.new_page(viewport={"width": 1024, "height": 1150})
        view.goto(page.as_uri())
        view.evaluate("document.getElementById('rollout').scrollIntoView()")
        save_screenshot(view, tmp_path, "notebook.png")
        browser.close()
    assert (tmp_path / "notebook.png").stat().st_size > 10_000
    assert os.path.getsize(tmp_path / "rollout_demo.executed.ipynb") > 10_000
