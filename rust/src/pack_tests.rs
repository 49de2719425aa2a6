//! Unit tests of `pack.rs`: hand-checked layouts, the truncation rule, errors, and randomised
//! invariants (a small xorshift generator keeps `cargo test` free of dev-dependencies).

use super::*;

fn ragged(seqs: &[Vec<i64>]) -> (Vec<i64>, Vec<i64>) {
    let mut values = Vec::new();
    let mut offsets = vec![0i64];
    for s in seqs {
        values.extend_from_slice(s);
        offsets.push(values.len() as i64);
    }
    (values, offsets)
}

fn run(
    p: &[Vec<i64>],
    c: &[Vec<i64>],
    r: &[Vec<i64>],
    opts: &PackOptions,
) -> Result<PackedBatch, PackError> {
    let (pv, po) = ragged(p);
    let (cv, co) = ragged(c);
    let (rv, ro) = ragged(r);
    pack(Ragged::new(&pv, &po), Ragged::new(&cv, &co), Ragged::new(&rv, &ro), opts)
}

fn row(b: &PackedBatch, a: &[i32], r: usize) -> Vec<i32> {
    a[r * b.row_len..(r + 1) * b.row_len].to_vec()
}

#[test]
fn padded_layout_is_trl() {
    let p = vec![vec![1, 2], vec![3]];
    let c = vec![vec![10, 11, 12], vec![13]];
    let r = vec![vec![20], vec![21, 22]];
    let mut o = PackOptions::new(100, Mode::Padded);
    o.pad_token_id = 9;
    let b = run(&p, &c, &r, &o).unwrap();
    assert_eq!((b.num_rows, b.row_len), (4, 5));
    assert_eq!(row(&b, &b.input_ids, 0), vec![1, 2, 10, 11, 12]);
    assert_eq!(row(&b, &b.input_ids, 1), vec![3, 13, 9, 9, 9]);
    assert_eq!(row(&b, &b.input_ids, 2), vec![1, 2, 20, 9, 9]);
    assert_eq!(row(&b, &b.input_ids, 3), vec![3, 21, 22, 9, 9]);
    assert_eq!(row(&b, &b.labels, 0), vec![-100, 10, 11, 12, -100]);
    assert_eq!(row(&b, &b.labels, 1), vec![13, -100, -100, -100, -100]);
    assert_eq!(row(&b, &b.labels, 3), vec![21, 22, -100, -100, -100]);
    assert_eq!(row(&b, &b.position_ids, 1), vec![0, 1, 2, 3, 4]);
    assert_eq!(b.attention_mask[5..10].to_vec(), vec![1, 1, 0, 0, 0]);
    assert_eq!(b.cu_seqlens, vec![0, 5, 10, 15, 20]);
    assert_eq!(b.pairs, vec![0, 2, 1, 3]);
    assert_eq!(b.example_index, vec![0, 1]);
    assert_eq!(b.seq_lens, vec![5, 2, 3, 3]);
    assert_eq!(b.completion_lens, vec![3, 1, 1, 2]);
    assert_eq!(b.max_seqlen, 5);
}

#[test]
fn packed_best_fit_decreasing() {
    // costs: pair0 = 2*1+1+1 = 4, pair1 = 2*2+2+2 = 8, pair2 = 2*0+3+3 = 6, pair3 = 4
    let p = vec![vec![1], vec![1, 2], vec![], vec![5]];
    let c = vec![vec![7], vec![7, 8], vec![3, 4, 5], vec![6]];
    let r = vec![vec![8], vec![8, 9], vec![6, 7, 8], vec![9]];
    let o = PackOptions::new(10, Mode::Packed);
    let b = run(&p, &c, &r, &o).unwrap();
    // order: 1 (8) -> row0 room 2; 2 (6) -> row1 room 4; 0 (4) -> row1 room 0; 3 (4) -> row2.
    assert_eq!(b.num_rows, 3);
    assert_eq!(b.row_len, 10);
    assert_eq!(b.example_index, vec![1, 2, 0, 3]);
    assert_eq!(b.pairs, vec![0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!(row(&b, &b.input_ids, 0), vec![1, 2, 7, 8, 1, 2, 8, 9, 0, 0]);
    assert_eq!(row(&b, &b.labels, 0), vec![-100, 7, 8, -100, -100, 8, 9, -100, -100, -100]);
    assert_eq!(row(&b, &b.position_ids, 0), vec![0, 1, 2, 3, 0, 1, 2, 3, 4, 5]);
    assert_eq!(row(&b, &b.input_ids, 1), vec![3, 4, 5, 6, 7, 8, 1, 7, 1, 8]);
    // empty prompt: the first completion token is not scored
    assert_eq!(row(&b, &b.labels, 1), vec![4, 5, -100, 7, 8, -100, 7, -100, 8, -100]);
    assert_eq!(b.cu_seqlens, vec![0, 4, 10, 13, 16, 18, 20, 22, 30]);
    assert_eq!(b.seq_lens, vec![4, 4, 3, 3, 2, 2, 2, 2]);
    assert_eq!(b.completion_lens, vec![2, 2, 2, 2, 1, 1, 1, 1]);
    assert_eq!(b.max_seqlen, 8);
}

#[test]
fn pad_to_multiple_of_and_zero_pairs() {
    let mut o = PackOptions::new(16, Mode::Packed);
    o.pad_to_multiple_of = Some(8);
    let b = run(&[vec![1]], &[vec![2]], &[vec![3]], &o).unwrap();
    assert_eq!((b.num_rows, b.row_len), (1, 8));
    assert_eq!(b.cu_seqlens, vec![0, 2, 8]);
    assert_eq!(b.position_ids, vec![0, 1, 0, 1, 2, 3, 4, 5]);
    let e = run(&[], &[], &[], &o).unwrap();
    assert_eq!((e.num_rows, e.row_len, e.max_seqlen), (0, 0, 0));
    assert_eq!(e.cu_seqlens, vec![0]);
    assert!(e.pairs.is_empty() && e.input_ids.is_empty());
}

#[test]
fn truncation_rule() {
    use Truncation::*;
    let k = |lp, lc, lr, m, t| {
        let k = fit_pair(lp, lc, lr, m, t);
        (k.prompt_start, k.prompt_len, k.chosen_len, k.rejected_len)
    };
    // fits: unchanged
    assert_eq!(k(3, 4, 5, 20, KeepStart), (0, 3, 4, 5));
    // keep_start: the long completion is cut first
    assert_eq!(k(3, 2, 10, 14, KeepStart), (0, 3, 2, 6));
    // both capped at the water level
    assert_eq!(k(3, 9, 10, 15, KeepStart), (0, 3, 4, 4));
    // completions down to 1 each, then the prompt's end goes
    assert_eq!(k(10, 5, 5, 9, KeepStart), (0, 3, 1, 1));
    // keep_end: the prompt's start goes first
    assert_eq!(k(10, 3, 4, 15, KeepEnd), (6, 4, 3, 4));
    // prompt kept at 1 token, then completions cut
    assert_eq!(k(10, 30, 4, 15, KeepEnd), (9, 1, 9, 4));
    // max_tokens 2: a lone token of each completion
    assert_eq!(k(10, 30, 4, 2, KeepEnd), (10, 0, 1, 1));
    assert_eq!(k(10, 30, 4, 3, KeepStart), (0, 0, 1, 1));
    assert_eq!(k(0, 1, 1, 2, KeepStart), (0, 0, 1, 1));
    // error: untouched (the caller rejects)
    assert_eq!(k(10, 30, 4, 5, Error), (0, 10, 30, 4));
}

#[test]
fn num_truncated_counts_shortened_pairs() {
    // costs: pair0 = 2*2+3+3 = 10, pair1 = 2*2+6+6 = 16, pair2 = 2*0+5+6 = 11
    let p = vec![vec![1, 2], vec![1, 2], vec![]];
    let c = vec![vec![3; 3], vec![3; 6], vec![3; 5]];
    let r = vec![vec![4; 3], vec![4; 6], vec![4; 6]];
    for mode in [Mode::Packed, Mode::Padded] {
        for t in [Truncation::KeepStart, Truncation::KeepEnd] {
            let mut o = PackOptions::new(10, mode);
            o.truncation = t;
            assert_eq!(run(&p, &c, &r, &o).unwrap().num_truncated, 2, "{t:?}");
        }
        assert_eq!(run(&p, &c, &r, &PackOptions::new(12, mode)).unwrap().num_truncated, 1);
        assert_eq!(run(&p, &c, &r, &PackOptions::new(100, mode)).unwrap().num_truncated, 0);
    }
}

#[test]
fn truncation_always_fits() {
    for m in 2..24 {
        for lp in 0..12 {
            for lc in 1..12 {
                for lr in 1..12 {
                    for t in [Truncation::KeepStart, Truncation::KeepEnd] {
                        let k = fit_pair(lp, lc, lr, m, t);
                        assert!(k.cost() <= m, "{lp} {lc} {lr} {m} {t:?} -> {k:?}");
                        assert!(k.chosen_len >= 1 && k.rejected_len >= 1);
                        assert!(k.chosen_len <= lc && k.rejected_len <= lr && k.prompt_len <= lp);
                        assert!(k.prompt_start + k.prompt_len <= lp);
                        if 2 * lp + lc + lr <= m {
                            assert_eq!(k, Kept { prompt_start: 0, prompt_len: lp, chosen_len: lc, rejected_len: lr });
                        }
                        if t == Truncation::KeepStart {
                            assert_eq!(k.prompt_start, 0);
                        } else {
                            assert_eq!(k.prompt_start + k.prompt_len, lp);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn errors_name_the_argument() {
    let o = PackOptions::new(10, Mode::Packed);
    let err = |p: &[Vec<i64>], c: &[Vec<i64>], r: &[Vec<i64>], o: &PackOptions| run(p, c, r, o).unwrap_err().message;
    let one = [vec![1i64]];
    assert!(err(&one, &one, &one, &PackOptions::new(1, Mode::Packed)).starts_with("max_tokens must be >= 2"));
    assert!(err(&one, &[vec![]], &one, &o).starts_with("chosen_ids[0] is empty"));
    assert!(err(&one, &one, &[vec![]], &o).starts_with("rejected_ids[0] is empty"));
    assert!(err(&[vec![1, -3]], &one, &one, &o).starts_with("prompt_ids[0][1] = -3 is out of range"));
    let mut ov = o.clone();
    ov.vocab_size = Some(5);
    assert!(err(&one, &[vec![1, 2, 5]], &one, &ov).contains("chosen_ids[0][2] = 5 is out of range: token ids must be in [0, vocab_size=5)"));
    assert!(err(&one, &one, &[vec![1i64 << 31]], &o).starts_with("rejected_ids[0][0] = 2147483648 is out of range"));
    assert!(err(&one, &one, &[vec![1], vec![2]], &o).contains("same number of sequences, got 1, 1 and 2"));
    let mut oe = o.clone();
    oe.truncation = Truncation::Error;
    assert!(err(&[vec![1; 4]], &[vec![2; 2]], &one, &oe).starts_with("pair 0 needs 11 tokens"));
    let mut op = o.clone();
    op.pad_token_id = -1;
    assert!(err(&one, &one, &one, &op).starts_with("pad_token_id = -1 is out of range"));
    let mut om = o.clone();
    om.pad_to_multiple_of = Some(0);
    assert!(err(&one, &one, &one, &om).starts_with("pad_to_multiple_of must be"));
    // broken offsets
    let v = [1i64, 2, 3];
    let good = [0i64, 1];
    for (offs, want) in [
        (&[][..], "offsets must have P + 1 >= 1 entries"),
        (&[-1, 1][..], "offsets[0] = -1 is negative"),
        (&[0, 2, 1][..], "offsets must be non-decreasing"),
        (&[0, 4][..], "offsets[-1] = 4 exceeds the 3 values"),
    ] {
        let e = pack(Ragged::new(&v, &good), Ragged::new(&v, offs), Ragged::new(&v, &good), &o).unwrap_err();
        assert!(e.message.starts_with("chosen_ids: ") && e.message.contains(want), "{}", e.message);
    }
    assert!(Mode::parse("x").is_err() && Truncation::parse("x").is_err());
}

#[test]
fn sliced_offsets_and_i32_values() {
    // Arrow slices: offsets need not start at 0.
    let pv: Vec<i32> = vec![99, 99, 1, 2];
    let po = [2i64, 4];
    let cv: Vec<i32> = vec![5, 6, 7];
    let co = [1i64, 3];
    let b = pack(Ragged::new(&pv, &po), Ragged::new(&cv, &co), Ragged::new(&cv, &co), &PackOptions::new(8, Mode::Packed)).unwrap();
    assert_eq!(b.input_ids, vec![1, 2, 6, 7, 1, 2, 6, 7]);
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Invariants over 10,000 random cases of both modes and all policies.
#[test]
fn random_invariants() {
    let mut rng = XorShift(0x9E3779B97F4A7C15);
    for case in 0..10_000 {
        let n = rng.below(9) as usize;
        let m = 2 + rng.below(40) as usize;
        let gen = |rng: &mut XorShift, min: u64| -> Vec<i64> {
            let len = min + rng.below(14);
            (0..len).map(|_| rng.below(50) as i64).collect()
        };
        let p: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 0)).collect();
        let c: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 1)).collect();
        let r: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 1)).collect();
        let mode = if rng.below(2) == 0 { Mode::Packed } else { Mode::Padded };
        let trunc = [Truncation::KeepStart, Truncation::KeepEnd, Truncation::Error][rng.below(3) as usize];
        let mut o = PackOptions::new(m, mode);
        o.truncation = trunc;
        o.pad_token_id = 7;
        o.pad_to_multiple_of = if rng.below(3) == 0 { Some(1 + rng.below(8) as usize) } else { None };
        let res = run(&p, &c, &r, &o);
        let b = match res {
            Ok(b) => b,
            Err(e) => {
                assert_eq!(trunc, Truncation::Error, "case {case}: {}", e.message);
                assert!(e.message.contains("max_tokens is"));
                continue;
            }
        };
        let l = b.row_len;
        assert_eq!(b.cu_seqlens.len(), 2 * n + 1);
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.num_rows * l);
        let mut seen = vec![false; n];
        for (j, pr) in b.pairs.chunks(2).enumerate() {
            let i = b.example_index[j] as usize;
            assert!(!seen[i]);
            seen[i] = true;
            for (which, &s) in pr.iter().enumerate() {
                let s = s as usize;
                let start = b.cu_seqlens[s] as usize;
                let len = b.seq_lens[s] as usize;
                let k = fit_pair(p[i].len(), c[i].len(), r[i].len(), m, trunc);
                let comp = if which == 0 { &c[i][..k.chosen_len] } else { &r[i][..k.rejected_len] };
                let want: Vec<i32> = p[i][k.prompt_start..k.prompt_start + k.prompt_len]
                    .iter()
                    .chain(comp)
                    .map(|&v| v as i32)
                    .collect();
                assert_eq!(&b.input_ids[start..start + len], &want[..]);
                for t in 0..len {
                    assert_eq!(b.position_ids[start + t] as usize, t);
                    assert_eq!(b.attention_mask[start + t], 1);
                    let lab = b.labels[start + t];
                    if t + 1 < len && t + 1 >= k.prompt_len {
                        assert_eq!(lab, want[t + 1]);
                    } else {
                        assert_eq!(lab, IGNORE_INDEX);
                    }
                }
            }
            if mode == Mode::Packed {
                // chosen and rejected adjacent in one row
                let (a, z) = (b.cu_seqlens[pr[0] as usize] as usize, b.cu_seqlens[pr[1] as usize] as usize);
                assert_eq!(a / l.max(1), z / l.max(1));
                assert_eq!(pr[1], pr[0] + 1);
            }
        }
        assert!(seen.iter().all(|&x| x));
        let real: usize = b.attention_mask.iter().map(|&x| x as usize).sum();
        assert_eq!(real, b.seq_lens.iter().map(|&x| x as usize).sum::<usize>());
        if mode == Mode::Packed {
            for rr in 0..b.num_rows {
                let used: usize = b.attention_mask[rr * l..(rr + 1) * l].iter().map(|&x| x as usize).sum();
                assert!(used <= m && used > 0);
            }
        }
        for (s, w) in b.cu_seqlens.windows(2).enumerate() {
            assert!(w[1] - w[0] >= b.seq_lens[s]);
        }
    }
}

/// The parallel fill (large batches) equals the serial one.
#[test]
fn parallel_fill_matches_serial() {
    let mut rng = XorShift(42);
    let n = 3000;
    let gen = |rng: &mut XorShift, lo: u64, span: u64| -> Vec<i64> {
        (0..lo + rng.below(span)).map(|_| rng.below(1000) as i64).collect()
    };
    let p: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 0, 300)).collect();
    let c: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 1, 400)).collect();
    let r: Vec<Vec<i64>> = (0..n).map(|_| gen(&mut rng, 1, 400)).collect();
    let o = PackOptions::new(2048, Mode::Packed);
    let big = run(&p, &c, &r, &o).unwrap();
    assert!(big.num_rows * big.row_len >= PARALLEL_MIN_SLOTS);
    // Pack each row's pairs alone (serial path) and compare row by row.
    for row_i in [0, big.num_rows / 2, big.num_rows - 1] {
        let seqs: Vec<usize> = (0..big.example_index.len())
            .filter(|&j| big.cu_seqlens[2 * j] as usize / big.row_len == row_i)
            .map(|j| big.example_index[j] as usize)
            .collect();
        let pick = |v: &Vec<Vec<i64>>| seqs.iter().map(|&i| v[i].clone()).collect::<Vec<_>>();
        let mut o1 = o.clone();
        o1.pad_to_multiple_of = Some(big.row_len);
        let small = run(&pick(&p), &pick(&c), &pick(&r), &o1).unwrap();
        assert_eq!(small.num_rows, 1);
        assert_eq!(small.input_ids, row(&big, &big.input_ids, row_i));
        assert_eq!(small.labels, row(&big, &big.labels, row_i));
        assert_eq!(small.position_ids, row(&big, &big.position_ids, row_i));
    }
}

#[test]
fn best_fit_decreasing_bins() {
    let (items, starts) = best_fit_decreasing(&[5, 3, 7, 3, 2, 5], 10);
    // 7 -> b0 (room 3); 5 (idx0) -> b1 (5); 5 (idx5) -> b1 (0); 3 (idx1) -> b0 (0); 3 (idx3) -> b2 (7); 2 -> b2
    assert_eq!(starts, vec![0, 2, 4, 6]);
    assert_eq!(items, vec![2, 1, 0, 5, 3, 4]);
    let (items, starts) = best_fit_decreasing(&[], 10);
    assert!(items.is_empty() && starts == vec![0]);
}

#[test]
fn pad_to_multiple_of_is_bounded_not_allocated() {
    // The case that used to abort the interpreter (an 8 GiB allocation for one pair).
    let one = [vec![1i64]];
    let mut o = PackOptions::new(16, Mode::Packed);
    o.pad_to_multiple_of = Some((1 << 31) - 1);
    let e = run(&one, &[vec![2]], &[vec![3]], &o).unwrap_err();
    assert_eq!(e.kind, PackErrorKind::Invalid);
    assert!(e.message.starts_with("pad_to_multiple_of must be in [1, max(max_tokens, 65536)]"), "{}", e.message);
    // The bound itself is accepted.
    o.pad_to_multiple_of = Some(max_pad_multiple(16));
    let b = run(&one, &[vec![2]], &[vec![3]], &o).unwrap();
    assert_eq!(b.row_len, PAD_MULTIPLE_FLOOR);
    o.pad_to_multiple_of = Some(0);
    assert_eq!(run(&one, &one, &one, &o).unwrap_err().kind, PackErrorKind::Invalid);
}

#[test]
fn allocation_failure_is_an_error_not_an_abort() {
    // 2^60 int32 = 4 EiB: a valid Layout that no allocator can satisfy.
    let e = try_zeroed::<i32>(1usize << 60, "input_ids").unwrap_err();
    assert_eq!(e.kind, PackErrorKind::OutOfMemory { bytes: 1u64 << 62 });
    assert!(e.message.contains("4611686018427387904 bytes") && e.message.contains("input_ids"), "{}", e.message);
    // Beyond isize::MAX bytes the Layout itself fails: same error kind.
    let e = try_zeroed::<i32>(usize::MAX / 2, "labels").unwrap_err();
    assert!(matches!(e.kind, PackErrorKind::OutOfMemory { .. }));
    let e = try_with_capacity::<u64>(usize::MAX / 4, "pairs").unwrap_err();
    assert!(matches!(e.kind, PackErrorKind::OutOfMemory { .. }));
    // Small sizes work and are zeroed.
    let v = try_zeroed::<i8>(1000, "attention_mask").unwrap();
    assert_eq!(v.len(), 1000);
    assert!(v.iter().all(|&x| x == 0));
    assert!(try_zeroed::<i32>(0, "x").unwrap().is_empty());
}

// ------------------------------------------------------------------------------------------------
// Single sequences

fn run_seqs(seqs: &[Vec<i64>], opts: &PackOptions) -> Result<PackedSequences, PackError> {
    let (v, o) = ragged(seqs);
    pack_sequences(Ragged::new(&v, &o), opts)
}

fn srow<T: Copy>(b: &PackedSequences, a: &[T], r: usize) -> Vec<T> {
    a[r * b.row_len..(r + 1) * b.row_len].to_vec()
}

#[test]
fn best_fit_uses_rooms_smaller_than_two() {
    // A 1-token item fits a room of 1 (the former fixed `room >= 2` rule opened a second bin here).
    assert_eq!(best_fit_decreasing(&[1, 1], 2), (vec![0, 1], vec![0, 2]));
    assert_eq!(best_fit_decreasing(&[2, 1, 1, 1], 3), (vec![0, 1, 2, 3], vec![0, 2, 4]));
    // Empty items join the fullest bin (room 0 included) instead of opening one of their own.
    assert_eq!(best_fit_decreasing(&[0, 3, 0, 2], 3), (vec![1, 0, 2, 3], vec![0, 3, 4]));
    assert_eq!(best_fit_decreasing(&[0, 0], 1), (vec![0, 1], vec![0, 2]));
}

#[test]
fn sequences_packed_layout() {
    // lengths 3, 1, 4, 2, 1 into rows of 5: 4 (s2) -> row0 room 1; 3 (s0) -> row1 room 2;
    // 2 (s3) -> row1 room 0; 1 (s1) -> row0 room 0; 1 (s4) -> row2.
    let s = vec![vec![1, 2, 3], vec![4], vec![5, 6, 7, 8], vec![9, 10], vec![11]];
    let mut o = PackOptions::new(5, Mode::Packed);
    o.pad_token_id = 99;
    let b = run_seqs(&s, &o).unwrap();
    assert_eq!((b.num_rows, b.row_len), (3, 5));
    assert_eq!(srow(&b, &b.input_ids, 0), vec![5, 6, 7, 8, 4]);
    assert_eq!(srow(&b, &b.input_ids, 1), vec![1, 2, 3, 9, 10]);
    assert_eq!(srow(&b, &b.input_ids, 2), vec![11, 99, 99, 99, 99]);
    assert_eq!(srow(&b, &b.position_ids, 0), vec![0, 1, 2, 3, 0]);
    assert_eq!(srow(&b, &b.position_ids, 1), vec![0, 1, 2, 0, 1]);
    assert_eq!(srow(&b, &b.position_ids, 2), vec![0, 1, 2, 3, 4]);
    assert_eq!(srow(&b, &b.attention_mask, 2), vec![1, 0, 0, 0, 0]);
    assert_eq!(b.example_index, vec![2, 1, 0, 3, 4]);
    assert_eq!(b.seq_lens, vec![4, 1, 3, 2, 1]);
    assert_eq!(b.cu_seqlens, vec![0, 4, 5, 8, 10, 15]);
    assert_eq!(b.max_seqlen, 5);
    assert_eq!(b.num_truncated, 0);
    // pad_to_multiple_of widens every row; the padding stays in each row's last sequence.
    o.pad_to_multiple_of = Some(4);
    let b = run_seqs(&s, &o).unwrap();
    assert_eq!(b.row_len, 8);
    assert_eq!(b.cu_seqlens, vec![0, 4, 8, 11, 16, 24]);
    assert_eq!(srow(&b, &b.position_ids, 0), vec![0, 1, 2, 3, 0, 1, 2, 3]);
}

#[test]
fn sequences_padded_layout_and_empty_batch() {
    let s = vec![vec![1, 2], vec![3, 4, 5], vec![6]];
    let b = run_seqs(&s, &PackOptions::new(64, Mode::Padded)).unwrap();
    assert_eq!((b.num_rows, b.row_len), (3, 3));
    assert_eq!(b.input_ids, vec![1, 2, 0, 3, 4, 5, 6, 0, 0]);
    assert_eq!(b.position_ids, vec![0, 1, 2, 0, 1, 2, 0, 1, 2]);
    assert_eq!(b.attention_mask, vec![1, 1, 0, 1, 1, 1, 1, 0, 0]);
    assert_eq!(b.cu_seqlens, vec![0, 3, 6, 9]);
    assert_eq!(b.example_index, vec![0, 1, 2]);
    assert_eq!(b.seq_lens, vec![2, 3, 1]);
    for mode in [Mode::Packed, Mode::Padded] {
        let b = run_seqs(&[], &PackOptions::new(8, mode)).unwrap();
        assert_eq!((b.num_rows, b.row_len, b.max_seqlen), (0, 0, 0));
        assert!(b.input_ids.is_empty() && b.example_index.is_empty() && b.seq_lens.is_empty());
        assert_eq!(b.cu_seqlens, vec![0]);
    }
}

#[test]
fn sequences_truncation_and_errors() {
    let s = vec![vec![1, 2, 3, 4, 5], vec![6, 7], vec![8, 9, 10]];
    let mut o = PackOptions::new(3, Mode::Padded);
    let b = run_seqs(&s, &o).unwrap();
    assert_eq!(b.input_ids, vec![1, 2, 3, 6, 7, 0, 8, 9, 10]);
    assert_eq!(b.num_truncated, 1);
    o.truncation = Truncation::KeepEnd;
    let b = run_seqs(&s, &o).unwrap();
    assert_eq!(b.input_ids, vec![3, 4, 5, 6, 7, 0, 8, 9, 10]);
    assert_eq!(fit_sequence(5, 3, Truncation::KeepEnd), (2, 3));
    assert_eq!(fit_sequence(3, 3, Truncation::KeepEnd), (0, 3));
    o.truncation = Truncation::Error;
    let e = run_seqs(&s, &o).unwrap_err();
    assert_eq!(e.kind, PackErrorKind::Invalid);
    assert!(e.message.starts_with("sequences[0] has 5 tokens but max_tokens is 3"), "{}", e.message);

    let o = PackOptions::new(8, Mode::Packed);
    let e = run_seqs(&[vec![1], vec![]], &o).unwrap_err();
    assert_eq!(e.message, "sequences[1] is empty: every sequence needs at least one token");
    let e = run_seqs(&[vec![1], vec![2, 3, -2]], &o).unwrap_err();
    assert!(e.message.starts_with("sequences[1][2] = -2 is out of range"), "{}", e.message);
    let mut o2 = o.clone();
    o2.vocab_size = Some(10);
    let e = run_seqs(&[vec![10]], &o2).unwrap_err();
    assert!(e.message.contains("[0, vocab_size=10)"), "{}", e.message);
    let v = [1i64, 2, 3];
    let e = pack_sequences(Ragged::new(&v, &[0, 2, 1]), &o).unwrap_err();
    assert!(e.message.starts_with("sequences: offsets must be non-decreasing"), "{}", e.message);
    let e = pack_sequences(Ragged::new(&v, &[0, 4]), &o).unwrap_err();
    assert!(e.message.starts_with("sequences: offsets[-1] = 4 exceeds"), "{}", e.message);
    let e = run_seqs(&[vec![1]], &PackOptions::new(1, Mode::Packed)).unwrap_err();
    assert!(e.message.starts_with("max_tokens must be >= 2"), "{}", e.message);
    // Arrow slices and int32 values.
    let v32: Vec<i32> = vec![7, 7, 1, 2, 3];
    let b = pack_sequences(Ragged::new(&v32, &[2, 3, 5]), &PackOptions::new(3, Mode::Packed)).unwrap();
    assert_eq!((b.num_rows, b.input_ids.clone()), (1, vec![2, 3, 1]));
}

/// Invariants over 10,000 random cases of both modes and all policies.
#[test]
fn sequences_random_invariants() {
    let mut rng = XorShift(0x2545F4914F6CDD1D);
    for case in 0..10_000 {
        let n = rng.below(12) as usize;
        let m = 2 + rng.below(30) as usize;
        let mut s: Vec<Vec<i64>> = Vec::new();
        for _ in 0..n {
            let span = 1 + rng.below(40);
            let len = 1 + rng.below(span); // mostly short, some long
            s.push((0..len).map(|_| rng.below(50) as i64).collect());
        }
        let mode = if rng.below(2) == 0 { Mode::Packed } else { Mode::Padded };
        let trunc = [Truncation::KeepStart, Truncation::KeepEnd, Truncation::Error][rng.below(3) as usize];
        let mut o = PackOptions::new(m, mode);
        o.truncation = trunc;
        o.pad_token_id = 3;
        o.pad_to_multiple_of = if rng.below(3) == 0 { Some(1 + rng.below(8) as usize) } else { None };
        let b = match run_seqs(&s, &o) {
            Ok(b) => b,
            Err(e) => {
                assert_eq!(trunc, Truncation::Error, "case {case}: {}", e.message);
                assert!(s.iter().any(|x| x.len() > m) && e.message.contains("but max_tokens is"));
                continue;
            }
        };
        let l = b.row_len;
        assert_eq!(b.cu_seqlens.len(), n + 1);
        assert_eq!(*b.cu_seqlens.last().unwrap() as usize, b.num_rows * l);
        let mut seen = vec![false; n];
        for (k, &i) in b.example_index.iter().enumerate() {
            let i = i as usize;
            assert!(!seen[i]);
            seen[i] = true;
            let (start, len) = fit_sequence(s[i].len(), m, trunc);
            assert_eq!(b.seq_lens[k] as usize, len);
            let (a, z) = (b.cu_seqlens[k] as usize, b.cu_seqlens[k + 1] as usize);
            assert!(z - a >= len && (z - a == len || z % l == 0), "case {case}: padding only at a row's end");
            let want: Vec<i32> = s[i][start..start + len].iter().map(|&v| v as i32).collect();
            assert_eq!(&b.input_ids[a..a + len], &want[..]);
            for t in a..z {
                assert_eq!(b.position_ids[t] as usize, t - a);
                assert_eq!(b.attention_mask[t], i8::from(t < a + len));
                if t >= a + len {
                    assert_eq!(b.input_ids[t], 3);
                }
            }
            assert_eq!(a / l, (a + len - 1) / l, "case {case}: a sequence never crosses a row");
        }
        assert!(seen.iter().all(|&x| x));
        assert_eq!(b.num_truncated, s.iter().filter(|x| x.len() > m).count());
        if mode == Mode::Packed {
            let padded_rows = n;
            assert!(b.num_rows <= padded_rows);
            for r in 0..b.num_rows {
                let used: usize = b.attention_mask[r * l..(r + 1) * l].iter().map(|&x| x as usize).sum();
                assert!(used <= m && used > 0);
            }
        } else {
            assert_eq!(b.num_rows, n);
        }
    }
}

/// The parallel fill (large batches) equals the serial one.
#[test]
fn sequences_parallel_fill_matches_serial() {
    let mut rng = XorShift(7);
    let s: Vec<Vec<i64>> = (0..4000).map(|_| (0..1 + rng.below(900)).map(|_| rng.below(1000) as i64).collect()).collect();
    let o = PackOptions::new(2048, Mode::Packed);
    let big = run_seqs(&s, &o).unwrap();
    assert!(big.num_rows * big.row_len >= PARALLEL_MIN_SLOTS);
    for r in [0, big.num_rows / 2, big.num_rows - 1] {
        let members: Vec<Vec<i64>> = (0..big.example_index.len())
            .filter(|&k| big.cu_seqlens[k] as usize / big.row_len == r)
            .map(|k| s[big.example_index[k] as usize].clone())
            .collect();
        let mut o1 = o.clone();
        o1.pad_to_multiple_of = Some(big.row_len);
        let small = run_seqs(&members, &o1).unwrap();
        assert_eq!(small.num_rows, 1);
        assert_eq!(small.input_ids, srow(&big, &big.input_ids, r));
        assert_eq!(small.position_ids, srow(&big, &big.position_ids, r));
        assert_eq!(small.attention_mask, srow(&big, &big.attention_mask, r));
    }
}
