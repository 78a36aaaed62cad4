"""From finished trials to answers: optima per cell, how they scale with rank, and the LRs the
measured curvature predicts."""
