//! Group-sparse weights (to be written).
