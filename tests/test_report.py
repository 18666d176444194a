"""The results tables of the README and docs/results.md are what `python -m benchmarks.report` makes of the committed
result files: a table typed by hand, or a result file changed without regenerating them, fails here."""

from benchmarks import report


def test_committed_tables_are_the_result_files_rendered(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_generation_rows_are_lossless_settings_only():
    for _, path in report.GENERATION:
        assert report.best_generation(path)["identical_outputs"]
