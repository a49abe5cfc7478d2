//! N:M structured sparse weights (to be written).
