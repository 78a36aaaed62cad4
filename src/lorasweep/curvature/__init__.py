"""`lorasweep curvature`: the loss Hessian's largest eigenvalue per method, and the LR it predicts.

hvp: Hessian-vector products over fixed batches; lanczos: extreme eigenvalues from products;
measure: blocks per cell, at init and after warm-up; predict: lr_star ~ lambda^-p. Importing the
package loads no torch (the report reads curvature.csv through `predict` alone).
"""
