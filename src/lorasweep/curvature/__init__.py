"""`lorasweep curvature`: the loss Hessian's largest eigenvalue per method, and the LR it predicts.

hvp: Hessian-vector products over fixed batches; lanczos: extreme eigenvalues from products;
measure: blocks per cell, at init and after warm-up; command: the command itself. The LR it
predicts (lr_star ~ lambda^-p) is analysis/curvature.py, which the report reads too, so the report
imports nothing of this folder.
"""
