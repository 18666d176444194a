"""Regression quality (GLUE's STS-B): Pearson's and Spearman's correlations and the mean squared error."""

import datasets
import evaluate
from scipy.stats import pearsonr
from scipy.stats import spearmanr
from sklearn.metrics import mean_squared_error


class Regression(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="",
            inputs_description="predictions, references: one score per sample.",
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        return {"pearson": float(pearsonr(predictions, references)[0]),
                "spearman": float(spearmanr(predictions, references)[0]),
                "mse": float(mean_squared_error(references, predictions))}
