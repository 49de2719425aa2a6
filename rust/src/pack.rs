//! Packing of (prompt, chosen, rejected) triples. (Filled in by the packing work.)
