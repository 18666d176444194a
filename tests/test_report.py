"""The results tables of the README and docs/results.md are what `python -m benchmarks.report` makes of the committed
result files: a table typed by hand, or a result file changed without regenerating them, fails here."""

from benchmarks import report


def test_committed_tables_are_the_result_files_rendered(capsys):
    assert report.main(["--check"]) == 0, capsys.readouterr().out


def test_generation_rows_are_lossless_settings_only():
    for _, path in report.GENERATION:
        assert report.best_generation(path)["identical_outputs"]


def test_every_result_file_is_cited():
    texts = report.citing_files()
    uncited = [
        path.name
        for folder in report.RESULT_FOLDERS
        for path in folder.glob("*.json")
        if not report.cited_by(path.name, texts)
    ]
    assert not uncited, f"cited by neither the README, the docs nor a model card: {uncited}"
