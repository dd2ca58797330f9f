"""The tutorial (docs/tutorial/) is checked, not just written: its Python blocks run in
order page by page, its C++ blocks are quotes that must still be in csrc/, its figures
exist and their scripts work, and its links lead somewhere."""
import os
import pathlib
import re
import sys

import pytest

from helpers import available_capabilities

ROOT = pathlib.Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "docs" / "tutorial"
PAGES = sorted(TUTORIAL.glob("0*.md"))


def test_all_pages_are_there():
    assert [p.name[:2] for p in PAGES] == ["01", "02", "03", "04", "05", "06", "07", "08"]
    index = (TUTORIAL / "README.md").read_text()
    for page in PAGES:
        assert f"({page.name})" in index
    assert "docs/tutorial/README.md" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_run_in_order(page, monkeypatch):
    monkeypatch.chdir(ROOT)
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    namespace = {"__name__": f"tutorial_{page.stem}"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page.name}, Python block {i + 1}", "exec"), namespace)


def quoted_excerpts():
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```cpp\n(.*?)```\n\n<sub>`([^`]+)`</sub>", text, re.S):
            yield pytest.param(page.name, match.group(1), match.group(2),
                               id=f"{page.name}:{match.group(1).splitlines()[0][:40]}")


@pytest.mark.parametrize("page,excerpt,source", list(quoted_excerpts()))
def test_cpp_blocks_are_quotes_of_the_sources(page, excerpt, source):
    assert source.startswith("csrc/"), source
    assert excerpt in (ROOT / source).read_text(), f"{page}: the quote from {source} is no longer in it"


def test_every_cpp_block_names_its_source():
    for page in PAGES:
        text = page.read_text()
        assert text.count("```cpp") == len(re.findall(r"```cpp\n.*?```\n\n<sub>`csrc/[^`]+`</sub>", text, re.S)), page.name


def test_links_and_figures_exist():
    for page in [TUTORIAL / "README.md", *PAGES]:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # links, not code
        for target in re.findall(r"\]\(([^)#]+)\)", prose):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_figure_script_makes_the_figure(tmp_path):
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import make_figures
    finally:
        sys.path.pop(0)
    errors = make_figures.variance_error(tmp_path / "variance_error.png")
    assert (tmp_path / "variance_error.png").stat().st_size > 1000
    # What page 2 says the figure shows: naive fails by 1e4, ours stays at float32 rounding.
    assert errors["naive E[x²] − E[x]²"][4] > 0.5
    assert max(errors["batchnorm_ext (blocks + Chan)"]) < 1e-6


def _steps_block(text):
    return re.search(r"<!-- steps -->\n(.*?)\n<!-- /steps -->", text, re.S).group(1).strip()


def test_measured_table_is_the_one_on_page_6():
    table = (TUTORIAL / "figures" / "steps.md").read_text().strip()
    assert _steps_block((TUTORIAL / "06-making-it-fast.md").read_text()) == table


CELL = re.compile(r"(\d+\.\d\d) ms(?: \((\d+\.\d)x\))?")


def test_page_6_table_is_what_measure_steps_makes_of_its_numbers(tmp_path, monkeypatch):
    """Runs docs/tutorial/figures/measure_steps.py with its timer replaced by one that
    returns the times on page 6 (each call still runs what it would time, once), into a
    copy of the page.  The table it writes must be the page's: same builds, cases, times,
    and speed-ups that follow from the times (within the rounding of the times shown);
    and what the prose says of it must hold."""
    import io
    import torch
    import batchnorm_ext
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import measure_steps
    finally:
        sys.path.pop(0)
    page_text = (TUTORIAL / "06-making-it-fast.md").read_text()
    shown = _steps_block(page_text).splitlines()
    header, rows = shown[0], [line for line in shown[2:] if line.startswith("| ")]
    builds = re.findall(r"ours, (\w+)", header)
    times = [[float(t) for t, _ in CELL.findall(row)] for row in rows]
    assert len(rows) == len(measure_steps.CASES) and all(len(t) == 1 + len(builds) for t in times)

    # The timer: the page's times, in the order the script takes them (per case, rounds of
    # native then each build); each function runs once (the first round) to show it works.
    order = iter([(i, j, rnd) for i in range(len(rows)) for rnd in range(3)
                  for j in range(1 + len(builds))])

    def page_time(fn):
        i, j, rnd = next(order)
        if rnd == 0:
            fn()
        return times[i][j]

    # The CPU the page was measured on had the builds it shows; the CPU here runs the
    # builds it has (the times are the page's anyway).
    available = available_capabilities()

    class Builds:
        BatchNorm2d = batchnorm_ext.BatchNorm2d

        @staticmethod
        def cpu_capability():
            return builds[-1]

        @staticmethod
        def set_cpu_capability(name):
            batchnorm_ext.set_cpu_capability(name if name in available else available[0])

    version, cpu = re.search(r"torch (\S+), (.+?), 1 thread", shown[-1]).groups()
    real_open = open

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return io.StringIO(f"model name\t: {cpu}\n")
        return real_open(path, *args, **kwargs)

    page_copy = tmp_path / "06-making-it-fast.md"
    page_copy.write_text(page_text.replace(_steps_block(page_text), "(to be measured)"))
    monkeypatch.setattr(measure_steps, "median_ms", page_time)
    monkeypatch.setattr(measure_steps, "batchnorm_ext", Builds)
    monkeypatch.setattr(measure_steps, "HERE", str(tmp_path))
    monkeypatch.setattr(measure_steps, "PAGE", str(page_copy))
    monkeypatch.setattr(measure_steps, "open", fake_open, raising=False)
    monkeypatch.setattr(torch, "__version__", version)
    threads, capability = torch.get_num_threads(), batchnorm_ext.cpu_capability()
    try:
        measure_steps.main()
    finally:
        torch.set_num_threads(threads)
        batchnorm_ext.set_cpu_capability(capability)
    made = (tmp_path / "steps.md").read_text().strip()
    assert _steps_block(page_copy.read_text()) == made

    # Equal but for the speed-ups, which the script computes from unrounded times.
    without_ratios = lambda text: re.sub(r" \(\d+\.\dx\)", "", text)
    assert without_ratios(made) == without_ratios(_steps_block(page_text))
    for row in rows:
        cells = CELL.findall(row)
        native = float(cells[0][0])
        for ours, ratio in cells[1:]:
            ours = float(ours)
            low, high = (native - 0.005) / (ours + 0.005), (native + 0.005) / (ours - 0.005)
            assert low - 0.05 <= float(ratio) <= high + 0.05, (row, ours, ratio)

    # "Channels-last with C = 3 is where native is weakest": the largest speed-ups.
    assert "Channels-last with C = 3 is where native is weakest" in page_text
    c3 = next(i for i, (shape, layout) in enumerate(measure_steps.CASES)
              if shape[1] == 3 and layout == "nhwc")
    for j in range(1, 1 + len(builds)):
        assert max(range(len(rows)), key=lambda i: times[i][0] / times[i][j]) == c3


def test_measure_steps_timer_times():
    """The timer measure_steps.py uses (the one the test above replaces) gives a time."""
    sys.path.insert(0, str(TUTORIAL / "figures"))
    try:
        import measure_steps
    finally:
        sys.path.pop(0)
    import torch
    threads = torch.get_num_threads()
    x = torch.randn(1000)
    try:
        assert 0 < measure_steps.median_ms(lambda: x.sum()) < 100
    finally:
        torch.set_num_threads(threads)
