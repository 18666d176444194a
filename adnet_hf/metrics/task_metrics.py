"""Task quality of classifiers and regressors, with one configuration per kind of task (as GLUE's metric has one per
task): "single_label" (accuracy), "two_class" (accuracy and the F1 of class 1, GLUE's metric for MRPC and QQP),
"multi_label" (accuracy with every label right, and the micro-averaged F1 over every label) and "regression"
(Pearson's and Spearman's correlations, mean squared error, GLUE's STS-B metric with the error added)."""

# One import per line: `evaluate.load` reads a module's imports line by line to check its dependencies.
import datasets  # noqa: I001
import evaluate
from scipy.stats import pearsonr
from scipy.stats import spearmanr
from sklearn.metrics import accuracy_score
from sklearn.metrics import f1_score
from sklearn.metrics import mean_squared_error

LABELS = {
    "single_label": datasets.Value("int64"),
    "two_class": datasets.Value("int64"),
    "multi_label": datasets.Sequence(datasets.Value("int64")),
    "regression": datasets.Value("float64"),
}


class TaskMetrics(evaluate.Metric):
    def _info(self):
        if self.config_name not in LABELS:
            raise KeyError(f"config_name must be one of {list(LABELS)}, got {self.config_name!r}")
        label = LABELS[self.config_name]
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: class indices; 0/1 per label (multi_label); scores "
                               "(regression).",
            features=datasets.Features({"predictions": label, "references": label}),
        )

    def _compute(self, predictions, references):
        if self.config_name == "regression":
            return {"pearson": float(pearsonr(predictions, references)[0]),
                    "spearman": float(spearmanr(predictions, references)[0]),
                    "mse": float(mean_squared_error(references, predictions))}
        metrics = {"accuracy": float(accuracy_score(references, predictions))}
        if self.config_name == "two_class":
            metrics["f1"] = float(f1_score(references, predictions, pos_label=1, average="binary"))
        if self.config_name == "multi_label":  # no label present nor predicted anywhere: nothing missed, F1 1
            metrics["micro_f1"] = float(f1_score(references, predictions, average="micro", zero_division=1.0))
        return metrics
