//! Packing of tokenized (prompt, chosen, rejected) triples -- or of single sequences -- into
//! model-ready rows.
//!
//! Plain Rust, no Python types: `cargo test` exercises it without an interpreter; `py.rs` is the
//! thin PyO3 layer and `python/dpo_fast/packing/_reference.py` is a line-by-line Python twin of this
//! file (same truncation, same best-fit order, same tie-breaks, same error kinds), used as the
//! test oracle and the speed baseline. Options are validated for users once, in Python
//! (`dpo_fast.packing.PackOptions`); `validate_options` here guards the Rust API's own invariants.
//! Output buffers are allocated fallibly: an allocation failure is `PackErrorKind::OutOfMemory`,
//! never an abort.
//!
//! # Sequences and labels
//! A pair `i` gives two sequences, `prompt_i + chosen_i` and `prompt_i + rejected_i`. Labels are
//! already shifted: `labels[t] = ids[t + 1]` when `t + 1` is a completion token of the same
//! sequence, else `IGNORE_INDEX` (-100). So prompt positions (except the last, which predicts the
//! first completion token), each sequence's last position and padding score nothing. A sequence
//! scores `len(completion)` tokens, or one fewer when its prompt is empty (the first completion
//! token then has no predecessor).
//!
//! # Truncation (per pair, independent of the mode)
//! A pair costs `2·|prompt| + |chosen| + |rejected|` tokens (the prompt is stored twice). When that
//! exceeds `max_tokens`:
//! - `Error`: fail, naming the pair.
//! - `KeepStart`: keep the start of every sequence. Completions are cut at their end first, the
//!   longer one first (a "water level": both are capped at the largest `k` such that
//!   `min(|c|, k) + min(|r|, k)` fits), never below 1 token each; then, if still too long, the
//!   prompt is cut at its end.
//! - `KeepEnd`: keep the end of every sequence. The prompt is cut at its start first (never below 1
//!   token if it had any); then completions are cut as above (a completion is always cut at its end:
//!   scoring a completion without its beginning would score tokens out of context); then, only for
//!   `max_tokens < 4`, the prompt may lose its last token.
//!
//! Any `max_tokens >= 2` therefore fits every pair (1 + 1 completion tokens, empty prompt).
//!
//! # Layout
//! Output arrays are `[rows, L]`, row-major. `padded`: `rows = 2P`, rows
//! `[chosen_0 .. chosen_{P-1}, rejected_0 .. rejected_{P-1}]` (TRL's layout), `L` = the longest
//! sequence. `packed`: pairs are placed best-fit-decreasing (largest pair first, ties by original
//! index; each into the open row with the least room that still fits it, ties by the oldest row;
//! else a new row), chosen and rejected adjacent in one row; `L` = the fullest row (≤ max_tokens).
//! `L` is then rounded up to `pad_to_multiple_of`.
//!
//! `cu_seqlens` (S + 1, int32, S = 2P) indexes the flattened `rows·L` layout. Padding is not a
//! segment of its own: each row's trailing padding belongs to the row's last sequence (labels -100,
//! so it scores nothing, and under causal attention no real token sees it). Hence the engine's
//! `sequence_logprobs(hidden.view(-1, H), W, labels.view(-1), cu_seqlens=cu_seqlens)` returns exactly
//! S values, sequence `s` being the s-th of the batch, and `pairs` (P, 2) indexes them directly.
//! `position_ids` restart at 0 at every segment start and run on through the trailing padding, so
//! a segmentation recovered from `position_ids == 0` equals `cu_seqlens`. `max_seqlen` is the longest
//! segment (what flash-attention's varlen kernels want).
//!
//! Cost: one read of every kept input token and one write of `rows·L·13` bytes (ids, labels,
//! positions as i32, mask as i8); the best-fit plan is O(P log P).
//!
//! # Single sequences
//! `pack_sequences` is the same packer for S plain token sequences (no prompt, no pairs, no labels),
//! sharing the options, the planner (`best_fit_decreasing` over sequence lengths instead of pair
//! costs), the row fill (`for_each_row`, positions, trailing padding) and `cu_seqlens`. Every sequence
//! must hold at least one token; one over `max_tokens` keeps its first (`KeepStart`) or last
//! (`KeepEnd`) `max_tokens` tokens, or fails (`Error`). `Padded`: S rows in input order; `Packed`:
//! rows of at most `max_tokens` tokens holding whole sequences. `example_index` (S) gives each placed
//! sequence's input index. Cost: `rows·L·9` bytes written (no labels).

use std::collections::BTreeSet;
use std::fmt;

/// Label value of positions that are not scored.
pub const IGNORE_INDEX: i32 = -100;

/// Exclusive upper bound of token ids (outputs are int32) and of every index into the flat layout.
pub const ID_LIMIT: i64 = 1 << 31;

/// `pad_to_multiple_of` may be at most `max(max_tokens, PAD_MULTIPLE_FLOOR)`: enough for tensor-core
/// rounding at any budget and for a static row shape (`pad_to_multiple_of = max_tokens`), while a
/// multiple beyond both is surely a mistake (it would only add padding).
pub const PAD_MULTIPLE_FLOOR: usize = 1 << 16;

/// Largest `pad_to_multiple_of` accepted with this `max_tokens`.
pub fn max_pad_multiple(max_tokens: usize) -> usize {
    max_tokens.max(PAD_MULTIPLE_FLOOR)
}

/// Below this many output slots the fill runs on the calling thread (spawning costs ~20 µs).
const PARALLEL_MIN_SLOTS: usize = 1 << 20;

/// Row layout: TRL's padded `[2P, L]` or best-fit packed rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Padded,
    Packed,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Self, PackError> {
        match s {
            "padded" => Ok(Mode::Padded),
            "packed" => Ok(Mode::Packed),
            _ => Err(PackError::new(format!("mode must be 'packed' or 'padded', got {s:?}"))),
        }
    }
}

/// What to do with a pair longer than `max_tokens` (see the module docs for the exact rule).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truncation {
    KeepStart,
    KeepEnd,
    Error,
}

impl Truncation {
    pub fn parse(s: &str) -> Result<Self, PackError> {
        match s {
            "keep_start" => Ok(Truncation::KeepStart),
            "keep_end" => Ok(Truncation::KeepEnd),
            "error" => Ok(Truncation::Error),
            _ => Err(PackError::new(format!(
                "truncation must be 'keep_start', 'keep_end' or 'error', got {s:?}"
            ))),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Token budget of one pair, and of one row in packed mode. >= 2.
    pub max_tokens: usize,
    pub mode: Mode,
    pub pad_token_id: i64,
    pub truncation: Truncation,
    /// Round the row length `L` up to a multiple of this (>= 1).
    pub pad_to_multiple_of: Option<usize>,
    /// When given, token ids must lie in `[0, vocab_size)`.
    pub vocab_size: Option<i64>,
}

impl PackOptions {
    pub fn new(max_tokens: usize, mode: Mode) -> Self {
        PackOptions {
            max_tokens,
            mode,
            pad_token_id: 0,
            truncation: Truncation::KeepStart,
            pad_to_multiple_of: None,
            vocab_size: None,
        }
    }
}

/// Why `pack` failed: bad options or data (`Invalid`), or an output buffer that could not be
/// allocated (`OutOfMemory`, with the bytes requested). The Python glue maps them to ValueError and
/// MemoryError.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackErrorKind {
    Invalid,
    OutOfMemory { bytes: u64 },
}

/// A failed pack. The message names the argument (and the pair/position for bad data), or the
/// buffer and its size for an allocation failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackError {
    pub kind: PackErrorKind,
    pub message: String,
}

impl PackError {
    pub fn new(message: impl Into<String>) -> Self {
        PackError { kind: PackErrorKind::Invalid, message: message.into() }
    }

    fn out_of_memory(what: &str, bytes: u64) -> Self {
        PackError {
            kind: PackErrorKind::OutOfMemory { bytes },
            message: format!(
                "could not allocate {bytes} bytes ({:.2} GiB) for the packed batch's {what}; pack fewer pairs per call \
                 or lower pad_to_multiple_of",
                bytes as f64 / (1u64 << 30) as f64
            ),
        }
    }
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PackError {}

/// Element types whose all-zero bit pattern is a valid value (so a zeroed allocation is initialised).
trait ZeroIsValid: Copy {}
impl ZeroIsValid for i8 {}
impl ZeroIsValid for i32 {}

/// A zero-filled `Vec` of `n` elements, or `OutOfMemory` instead of aborting the process.
///
/// `alloc_zeroed` (calloc) hands out lazily zeroed pages, so the threads of `fill` fault in the pages
/// they write (a `vec![0; n]` would do the same, but aborts when the allocation fails).
fn try_zeroed<T: ZeroIsValid>(n: usize, what: &str) -> Result<Vec<T>, PackError> {
    let bytes = (n as u64).saturating_mul(std::mem::size_of::<T>() as u64);
    let layout = std::alloc::Layout::array::<T>(n).map_err(|_| PackError::out_of_memory(what, bytes))?;
    if layout.size() == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: the layout has a non-zero size; a null return is handled; the memory is zeroed, which is
    // a valid `T` (ZeroIsValid), and it comes from the global allocator with exactly this layout, as
    // `Vec::from_raw_parts` requires (capacity == length == n).
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            return Err(PackError::out_of_memory(what, bytes));
        }
        Ok(Vec::from_raw_parts(ptr, n, n))
    }
}

/// An empty `Vec` with room for `n` elements, or `OutOfMemory` instead of aborting the process.
fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>, PackError> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| {
        PackError::out_of_memory(what, (n as u64).saturating_mul(std::mem::size_of::<T>() as u64))
    })?;
    Ok(v)
}

/// Integer element types accepted as token ids.
pub trait TokenId: Copy + Send + Sync {
    fn get(self) -> i64;
}

impl TokenId for i32 {
    #[inline(always)]
    fn get(self) -> i64 {
        self as i64
    }
}

impl TokenId for i64 {
    #[inline(always)]
    fn get(self) -> i64 {
        self
    }
}

/// Ragged array in Arrow's list layout: sequence `i` is `values[offsets[i]..offsets[i + 1]]`.
/// `offsets` has P + 1 entries; `offsets[0]` need not be 0 (a sliced Arrow array).
#[derive(Clone, Copy, Debug)]
pub struct Ragged<'a, T> {
    pub values: &'a [T],
    pub offsets: &'a [i64],
}

impl<'a, T> Ragged<'a, T> {
    pub fn new(values: &'a [T], offsets: &'a [i64]) -> Self {
        Ragged { values, offsets }
    }

    /// Checked against `values` by `validate_offsets`; afterwards `seq` cannot go out of bounds.
    fn validate_offsets(&self, arg: &str) -> Result<usize, PackError> {
        let o = self.offsets;
        if o.is_empty() {
            return Err(PackError::new(format!(
                "{arg}: offsets must have P + 1 >= 1 entries, got an empty array"
            )));
        }
        if o[0] < 0 {
            return Err(PackError::new(format!("{arg}: offsets[0] = {} is negative", o[0])));
        }
        for k in 1..o.len() {
            if o[k] < o[k - 1] {
                return Err(PackError::new(format!(
                    "{arg}: offsets must be non-decreasing, got offsets[{}] = {} > offsets[{k}] = {}",
                    k - 1,
                    o[k - 1],
                    o[k]
                )));
            }
        }
        let last = o[o.len() - 1];
        if last as u64 > self.values.len() as u64 {
            return Err(PackError::new(format!(
                "{arg}: offsets[-1] = {last} exceeds the {} values",
                self.values.len()
            )));
        }
        Ok(o.len() - 1)
    }

    #[inline]
    fn seq(&self, i: usize) -> &'a [T] {
        &self.values[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// The part of a pair that survives truncation: `prompt[prompt_start..prompt_start + prompt_len]`,
/// `chosen[..chosen_len]`, `rejected[..rejected_len]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kept {
    pub prompt_start: usize,
    pub prompt_len: usize,
    pub chosen_len: usize,
    pub rejected_len: usize,
}

impl Kept {
    /// Tokens the pair occupies in a row (the prompt is stored twice).
    #[inline]
    pub fn cost(&self) -> usize {
        2 * self.prompt_len + self.chosen_len + self.rejected_len
    }
}

/// Cap two completions (each >= 1 token) to at most `budget` tokens together: the longer is cut
/// first, never below 1 token each (so the result may exceed a budget < 2).
fn shrink_completions(lc: usize, lr: usize, budget: usize) -> (usize, usize) {
    if lc + lr <= budget {
        return (lc, lr);
    }
    if budget < 2 {
        return (1, 1);
    }
    let short = lc.min(lr);
    if 2 * short <= budget {
        let cap = budget - short; // the short one stays whole, the long one takes the rest
        (lc.min(cap), lr.min(cap))
    } else {
        (budget / 2, budget / 2)
    }
}

/// Apply the truncation policy to one pair (lengths of prompt, chosen, rejected; chosen and
/// rejected >= 1; max_tokens >= 2). `Truncation::Error` is treated as "no truncation": the caller
/// checks `cost() > max_tokens` itself.
pub fn fit_pair(lp: usize, lc: usize, lr: usize, max_tokens: usize, policy: Truncation) -> Kept {
    let m = max_tokens;
    let whole = Kept { prompt_start: 0, prompt_len: lp, chosen_len: lc, rejected_len: lr };
    if policy == Truncation::Error || whole.cost() <= m {
        return whole;
    }
    match policy {
        Truncation::KeepStart => {
            let (c, r) = shrink_completions(lc, lr, m.saturating_sub(2 * lp));
            let p = lp.min((m - c - r) / 2);
            Kept { prompt_start: 0, prompt_len: p, chosen_len: c, rejected_len: r }
        }
        Truncation::KeepEnd => {
            let floor = lp.min(1);
            let mut p = floor.max(lp.min(m.saturating_sub(lc + lr) / 2));
            let (c, r) = shrink_completions(lc, lr, m.saturating_sub(2 * p));
            p = p.min((m - c - r) / 2);
            Kept { prompt_start: lp - p, prompt_len: p, chosen_len: c, rejected_len: r }
        }
        Truncation::Error => unreachable!(),
    }
}

/// Output of `pack`. 2-D arrays are row-major `[num_rows, row_len]`, flattened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedBatch {
    pub num_rows: usize,
    pub row_len: usize,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub attention_mask: Vec<i8>,
    /// (S + 1,) segment boundaries in the flattened layout; S = 2P.
    pub cu_seqlens: Vec<i32>,
    /// (P, 2) flattened: (chosen, rejected) sequence index of each pair, in batch order.
    pub pairs: Vec<i64>,
    /// (P,) original index of each pair.
    pub example_index: Vec<i64>,
    /// (S,) real tokens of each sequence (segment length minus trailing padding).
    pub seq_lens: Vec<i32>,
    /// (S,) scored tokens of each sequence (labels != -100): completion length, minus one when the
    /// prompt is empty.
    pub completion_lens: Vec<i32>,
    /// Longest segment of `cu_seqlens` (padding included).
    pub max_seqlen: usize,
    /// Pairs the truncation policy shortened to fit `max_tokens` (0 with `Truncation::Error`).
    pub num_truncated: usize,
}

/// One sequence as placed in the output: which pair, and chosen (false) or rejected (true).
#[derive(Clone, Copy)]
struct Placed {
    pair: u32,
    rejected: bool,
}

fn validate_options(opts: &PackOptions) -> Result<i64, PackError> {
    if opts.max_tokens < 2 {
        return Err(PackError::new(format!(
            "max_tokens must be >= 2 (the smallest budget the packers take: a pair's one chosen and one \
             rejected token), got {}",
            opts.max_tokens
        )));
    }
    if opts.max_tokens as u64 >= ID_LIMIT as u64 {
        return Err(PackError::new(format!(
            "max_tokens must be < 2147483648, got {}",
            opts.max_tokens
        )));
    }
    if let Some(m) = opts.pad_to_multiple_of {
        let hi = max_pad_multiple(opts.max_tokens);
        if m < 1 || m > hi {
            return Err(PackError::new(format!(
                "pad_to_multiple_of must be in [1, max(max_tokens, {PAD_MULTIPLE_FLOOR})] = [1, {hi}], got {m}"
            )));
        }
    }
    let limit = match opts.vocab_size {
        Some(v) if !(1..=ID_LIMIT).contains(&v) => {
            return Err(PackError::new(format!("vocab_size must be in [1, 2147483648], got {v}")));
        }
        Some(v) => v,
        None => ID_LIMIT,
    };
    let pad = opts.pad_token_id;
    if pad < 0 || pad >= limit {
        return Err(PackError::new(format!(
            "pad_token_id = {pad} is out of range: it must be in [0, {})",
            range_name(opts.vocab_size)
        )));
    }
    Ok(limit)
}

fn range_name(vocab_size: Option<i64>) -> String {
    match vocab_size {
        Some(v) => format!("vocab_size={v}"),
        None => "2147483648".to_string(),
    }
}

#[inline]
fn check_ids<T: TokenId>(
    arg: &str,
    pair: usize,
    seq: &[T],
    limit: i64,
    vocab_size: Option<i64>,
) -> Result<(), PackError> {
    // Branch-free scan (vectorises); the slow search for the culprit runs only on failure.
    let ok = seq.iter().fold(true, |acc, &v| {
        let v = v.get();
        acc & (v >= 0) & (v < limit)
    });
    if ok {
        return Ok(());
    }
    let (j, v) = seq
        .iter()
        .map(|&v| v.get())
        .enumerate()
        .find(|&(_, v)| v < 0 || v >= limit)
        .expect("a bad id exists");
    Err(PackError::new(format!(
        "{arg}[{pair}][{j}] = {v} is out of range: token ids must be in [0, {})",
        range_name(vocab_size)
    )))
}

/// Pack P pairs. Errors (never panics) on bad options or data; see the module docs for the layout.
pub fn pack<T: TokenId>(
    prompt: Ragged<'_, T>,
    chosen: Ragged<'_, T>,
    rejected: Ragged<'_, T>,
    opts: &PackOptions,
) -> Result<PackedBatch, PackError> {
    let limit = validate_options(opts)?;
    let n_prompt = prompt.validate_offsets("prompt_ids")?;
    let n_chosen = chosen.validate_offsets("chosen_ids")?;
    let n_rejected = rejected.validate_offsets("rejected_ids")?;
    if n_chosen != n_prompt || n_rejected != n_prompt {
        return Err(PackError::new(format!(
            "prompt_ids, chosen_ids and rejected_ids must hold the same number of sequences, got {n_prompt}, {n_chosen} and {n_rejected}"
        )));
    }
    let n_pairs = n_prompt;
    if n_pairs as u64 >= (ID_LIMIT / 2) as u64 {
        return Err(PackError::new(format!("too many pairs for int32 cu_seqlens: {n_pairs}")));
    }

    // Per pair: validate, then truncate.
    let m = opts.max_tokens;
    let mut kept = try_with_capacity(n_pairs, "per-pair plan")?;
    let mut num_truncated = 0usize;
    for i in 0..n_pairs {
        let (p, c, r) = (prompt.seq(i), chosen.seq(i), rejected.seq(i));
        if c.is_empty() {
            return Err(PackError::new(format!(
                "chosen_ids[{i}] is empty: every completion needs at least one token"
            )));
        }
        if r.is_empty() {
            return Err(PackError::new(format!(
                "rejected_ids[{i}] is empty: every completion needs at least one token"
            )));
        }
        check_ids("prompt_ids", i, p, limit, opts.vocab_size)?;
        check_ids("chosen_ids", i, c, limit, opts.vocab_size)?;
        check_ids("rejected_ids", i, r, limit, opts.vocab_size)?;
        let k = fit_pair(p.len(), c.len(), r.len(), m, opts.truncation);
        if k.cost() > m {
            return Err(PackError::new(format!(
                "pair {i} needs {} tokens (prompt {} counted twice, chosen {}, rejected {}) but max_tokens is {m}; \
                 use truncation='keep_start' or 'keep_end', or raise max_tokens",
                k.cost(),
                p.len(),
                c.len(),
                r.len()
            )));
        }
        if (k.prompt_len, k.chosen_len, k.rejected_len) != (p.len(), c.len(), r.len()) {
            num_truncated += 1;
        }
        kept.push(k);
    }

    // Plan: the sequences of every row, in order.
    let (order, row_starts, row_len) = match opts.mode {
        Mode::Padded => plan_padded(&kept)?,
        Mode::Packed => plan_packed(&kept, m)?,
    };
    let row_len = round_row_len(row_len, opts.pad_to_multiple_of);
    let num_rows = row_starts.len() - 1;
    let n = check_slots(num_rows, row_len, "pairs")?;
    let mut out = PackedBatch {
        num_rows,
        row_len,
        input_ids: try_zeroed(n, "input_ids")?,
        labels: try_zeroed(n, "labels")?,
        position_ids: try_zeroed(n, "position_ids")?,
        attention_mask: try_zeroed(n, "attention_mask")?,
        num_truncated,
        ..Default::default()
    };
    fill(&mut out, &order, &row_starts, &kept, prompt, chosen, rejected, opts.pad_token_id as i32);
    index(&mut out, &order, &row_starts, &kept, opts.mode)?;
    Ok(out)
}

/// The row length `L` rounded up to `pad_to_multiple_of`.
fn round_row_len(row_len: usize, pad_to_multiple_of: Option<usize>) -> usize {
    match pad_to_multiple_of {
        // row_len <= max_tokens < 2^31 and mult <= max(max_tokens, 2^16): no overflow in u64.
        Some(mult) => {
            (row_len as u64).div_ceil(mult as u64).saturating_mul(mult as u64).min(usize::MAX as u64) as usize
        }
        None => row_len,
    }
}

/// `num_rows * row_len` when int32 indices can address every slot; `unit` names what to pack fewer of.
fn check_slots(num_rows: usize, row_len: usize, unit: &str) -> Result<usize, PackError> {
    let slots = (num_rows as u64).saturating_mul(row_len as u64);
    if slots >= ID_LIMIT as u64 {
        return Err(PackError::new(format!(
            "the batch would hold {slots} token slots ({num_rows} rows x {row_len}), more than int32 \
             cu_seqlens can address (2147483647); pack fewer {unit} per call"
        )));
    }
    Ok(slots as usize) // < 2^31
}

fn seq_len(k: &Kept, rejected: bool) -> usize {
    k.prompt_len + if rejected { k.rejected_len } else { k.chosen_len }
}

/// TRL's layout: rows [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}], one sequence each.
fn plan_padded(kept: &[Kept]) -> Result<(Vec<Placed>, Vec<usize>, usize), PackError> {
    let p = kept.len();
    let mut order = try_with_capacity(2 * p, "row plan")?;
    for rejected in [false, true] {
        order.extend((0..p).map(|i| Placed { pair: i as u32, rejected }));
    }
    let row_starts: Vec<usize> = (0..=2 * p).collect();
    let row_len = order.iter().map(|s| seq_len(&kept[s.pair as usize], s.rejected)).max().unwrap_or(0);
    Ok((order, row_starts, row_len))
}

/// Best-fit-decreasing bin packing of items of the given sizes (each <= capacity) into bins of
/// `capacity`. Items are taken largest first (ties: smaller index first); each goes to the open bin
/// with the least remaining room that still fits it (ties: the older bin), or opens a new bin.
/// Returns (items in output order, bin_starts): bin `b` holds `items[bin_starts[b]..bin_starts[b+1]]`,
/// bins in opening order, items within a bin in placement order. O(n log n).
///
/// Any item size >= 0 works: a 1-token sequence fills a room of 1, an empty item goes to the fullest
/// bin (least room, possibly 0) and opens a bin only when there is none yet.
pub fn best_fit_decreasing(sizes: &[usize], capacity: usize) -> (Vec<u32>, Vec<usize>) {
    let n = sizes.len();
    let mut by_size: Vec<u32> = (0..n as u32).collect();
    // Stable sort: equal sizes keep ascending index.
    by_size.sort_by_key(|&i| std::cmp::Reverse(sizes[i as usize]));
    // Items come largest first, so a room below the smallest item can never be used again: such rooms
    // are not kept (a smaller set; the plan is the same as keeping every room, so pairs, which all cost
    // >= 2, get the plan the former fixed `room >= 2` rule gave).
    let smallest = sizes.iter().copied().min().unwrap_or(0);

    // (remaining room, bin id) of every open bin; the smallest key >= (size, 0) is the best fit.
    let mut open: BTreeSet<(usize, u32)> = BTreeSet::new();
    let mut fill: Vec<usize> = Vec::new();
    let mut bin_of: Vec<u32> = Vec::with_capacity(n); // bin of the k-th placed item
    for &i in &by_size {
        let size = sizes[i as usize];
        let bin = match open.range((size, 0)..).next().copied() {
            Some(key) => {
                open.remove(&key);
                key.1
            }
            None => {
                fill.push(0);
                (fill.len() - 1) as u32
            }
        };
        fill[bin as usize] += size;
        let room = capacity.saturating_sub(fill[bin as usize]);
        if room >= smallest {
            open.insert((room, bin));
        }
        bin_of.push(bin);
    }
    // Counting sort of placed items by bin, keeping placement order inside each bin.
    let mut bin_starts = vec![0usize; fill.len() + 1];
    for &b in &bin_of {
        bin_starts[b as usize + 1] += 1;
    }
    for b in 0..fill.len() {
        bin_starts[b + 1] += bin_starts[b];
    }
    let mut cursor = bin_starts.clone();
    let mut items = vec![0u32; n];
    for (k, &b) in bin_of.iter().enumerate() {
        items[cursor[b as usize]] = by_size[k];
        cursor[b as usize] += 1;
    }
    (items, bin_starts)
}

/// Packed layout: best-fit-decreasing over pair costs; each pair contributes (chosen, rejected).
fn plan_packed(kept: &[Kept], max_tokens: usize) -> Result<(Vec<Placed>, Vec<usize>, usize), PackError> {
    let costs: Vec<usize> = kept.iter().map(Kept::cost).collect();
    let (items, bin_starts) = best_fit_decreasing(&costs, max_tokens);
    let mut order = try_with_capacity(2 * items.len(), "row plan")?;
    for &pair in &items {
        order.push(Placed { pair, rejected: false });
        order.push(Placed { pair, rejected: true });
    }
    let row_starts: Vec<usize> = bin_starts.iter().map(|&s| 2 * s).collect();
    let row_len = bin_starts
        .windows(2)
        .map(|w| items[w[0]..w[1]].iter().map(|&i| costs[i as usize]).sum::<usize>())
        .max()
        .unwrap_or(0);
    Ok((order, row_starts, row_len))
}

/// Mutable row-major `[rows, L]` output buffers that can be cut between rows: one slice, or a tuple
/// of them cut at the same slot.
trait RowBufs: Sized + Send {
    fn split_at_slot(self, slot: usize) -> (Self, Self);
}

impl<T: Send> RowBufs for &mut [T] {
    fn split_at_slot(self, slot: usize) -> (Self, Self) {
        self.split_at_mut(slot)
    }
}

impl<A: RowBufs, B: RowBufs, C: RowBufs> RowBufs for (A, B, C) {
    fn split_at_slot(self, slot: usize) -> (Self, Self) {
        let (a0, a1) = self.0.split_at_slot(slot);
        let (b0, b1) = self.1.split_at_slot(slot);
        let (c0, c1) = self.2.split_at_slot(slot);
        ((a0, b0, c0), (a1, b1, c1))
    }
}

impl<A: RowBufs, B: RowBufs, C: RowBufs, D: RowBufs> RowBufs for (A, B, C, D) {
    fn split_at_slot(self, slot: usize) -> (Self, Self) {
        let (a0, a1) = self.0.split_at_slot(slot);
        let ((b0, c0, d0), (b1, c1, d1)) = (self.1, self.2, self.3).split_at_slot(slot);
        ((a0, b0, c0, d0), (a1, b1, c1, d1))
    }
}

/// Call `fill_row(r, buffers of row r)` for every row of `[rows, l]` buffers: on the calling thread
/// for small batches, else on up to 8 threads, each a contiguous band of rows of equal slot count
/// (the work is memory bound: ~9-13 bytes written per slot). Fresh zeroed pages are faulted in by the
/// thread that first writes them, so the page-fault cost is spread too.
fn for_each_row<B: RowBufs>(bufs: B, rows: usize, l: usize, fill_row: impl Fn(usize, B) + Sync) {
    if rows == 0 || l == 0 {
        return;
    }
    let band = |r0: usize, nr: usize, mut rest: B| {
        for r in r0..r0 + nr {
            let (this, tail) = rest.split_at_slot(l);
            fill_row(r, this);
            rest = tail;
        }
    };
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(8);
    if threads < 2 || rows * l < PARALLEL_MIN_SLOTS || rows < 2 {
        band(0, rows, bufs);
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|scope| {
        let mut rest = bufs;
        let mut r0 = 0;
        while r0 < rows {
            let nr = per.min(rows - r0);
            let (this, tail) = rest.split_at_slot(nr * l);
            rest = tail;
            let band = &band;
            scope.spawn(move || band(r0, nr, this));
            r0 += nr;
        }
    });
}

/// Copy token ids (validated: in `[0, 2^31)`) into an int32 row.
#[inline]
fn write_ids<T: TokenId>(dst: &mut [i32], src: &[T]) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = v.get() as i32;
    }
}

/// Positions `start, start + 1, ...` over `dst`.
#[inline]
fn write_positions(dst: &mut [i32], start: usize) {
    for (t, d) in dst.iter_mut().enumerate() {
        *d = (start + t) as i32;
    }
}

/// A row's trailing padding from slot `at` on: `pad` ids, positions continuing the row's last
/// sequence (`last_len` tokens), so it is part of that segment (see module docs). The mask there is
/// already 0 (zero-initialised output).
#[inline]
fn pad_row_tail(ids: &mut [i32], positions: &mut [i32], at: usize, last_len: usize, pad: i32) {
    ids[at..].fill(pad);
    write_positions(&mut positions[at..], last_len);
}

/// Write one row of pairs: its sequences back to back, then padding that continues the last
/// sequence's positions.
#[allow(clippy::too_many_arguments)]
fn fill_row<T: TokenId>(
    ids: &mut [i32],
    labels: &mut [i32],
    positions: &mut [i32],
    mask: &mut [i8],
    seqs: &[Placed],
    kept: &[Kept],
    prompt: Ragged<'_, T>,
    chosen: Ragged<'_, T>,
    rejected: Ragged<'_, T>,
    pad: i32,
) {
    let mut at = 0usize;
    let mut last_len = 0usize;
    for s in seqs {
        let i = s.pair as usize;
        let k = &kept[i];
        let p = &prompt.seq(i)[k.prompt_start..k.prompt_start + k.prompt_len];
        let c = if s.rejected { &rejected.seq(i)[..k.rejected_len] } else { &chosen.seq(i)[..k.chosen_len] };
        let (lp, n) = (p.len(), p.len() + c.len());
        write_ids(&mut ids[at..at + lp], p);
        write_ids(&mut ids[at + lp..at + n], c);
        // labels[t] = ids[t + 1] for t in [max(lp, 1) - 1, n - 1); the rest -100.
        let first = lp.max(1) - 1;
        let lab = &mut labels[at..at + n];
        lab[..first].fill(IGNORE_INDEX);
        lab[first..n - 1].copy_from_slice(&ids[at + first + 1..at + n]);
        lab[n - 1] = IGNORE_INDEX;
        write_positions(&mut positions[at..at + n], 0);
        mask[at..at + n].fill(1);
        at += n;
        last_len = n;
    }
    labels[at..].fill(IGNORE_INDEX);
    pad_row_tail(ids, positions, at, last_len, pad);
}

#[allow(clippy::too_many_arguments)]
fn fill<T: TokenId>(
    out: &mut PackedBatch,
    order: &[Placed],
    row_starts: &[usize],
    kept: &[Kept],
    prompt: Ragged<'_, T>,
    chosen: Ragged<'_, T>,
    rejected: Ragged<'_, T>,
    pad: i32,
) {
    let bufs = (
        out.input_ids.as_mut_slice(),
        out.labels.as_mut_slice(),
        out.position_ids.as_mut_slice(),
        out.attention_mask.as_mut_slice(),
    );
    for_each_row(bufs, out.num_rows, out.row_len, |r, (ids, lab, pos, mask)| {
        let seqs = &order[row_starts[r]..row_starts[r + 1]];
        fill_row(ids, lab, pos, mask, seqs, kept, prompt, chosen, rejected, pad);
    });
}

/// `cu_seqlens` of the flattened `[num_rows, l]` layout, whose row `r` holds the placed sequences
/// `row_starts[r]..row_starts[r + 1]` back to back (`len(k)`: real tokens of the k-th placed sequence);
/// each row's trailing padding is counted in its last sequence. Also returns the longest segment.
fn segments(
    num_rows: usize,
    l: usize,
    row_starts: &[usize],
    len: impl Fn(usize) -> usize,
) -> Result<(Vec<i32>, usize), PackError> {
    let mut cu = try_with_capacity(row_starts[num_rows] + 1, "cu_seqlens")?;
    for r in 0..num_rows {
        let mut at = r * l;
        for k in row_starts[r]..row_starts[r + 1] {
            cu.push(at as i32);
            at += len(k);
        }
    }
    cu.push((num_rows * l) as i32);
    let max_seqlen = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
    Ok((cu, max_seqlen))
}

/// cu_seqlens, pairs, example_index, seq_lens, completion_lens, max_seqlen.
fn index(
    out: &mut PackedBatch,
    order: &[Placed],
    row_starts: &[usize],
    kept: &[Kept],
    mode: Mode,
) -> Result<(), PackError> {
    let s_total = order.len();
    let p = kept.len();
    let len_of = |s: &Placed| seq_len(&kept[s.pair as usize], s.rejected);
    let (cu, max_seqlen) = segments(out.num_rows, out.row_len, row_starts, |k| len_of(&order[k]))?;
    let mut seq_lens = try_with_capacity(s_total, "seq_lens")?;
    let mut comp = try_with_capacity(s_total, "completion_lens")?;
    for s in order {
        let n = len_of(s);
        seq_lens.push(n as i32);
        comp.push((n - kept[s.pair as usize].prompt_len.max(1)) as i32);
    }
    out.max_seqlen = max_seqlen;
    let mut pairs = try_with_capacity(2 * p, "pairs")?;
    let mut example_index = try_with_capacity(p, "example_index")?;
    match mode {
        Mode::Padded => {
            for i in 0..p {
                pairs.push(i as i64);
                pairs.push((p + i) as i64);
                example_index.push(i as i64);
            }
        }
        Mode::Packed => {
            // order holds (chosen, rejected) of each pair adjacently.
            for (j, s) in order.iter().step_by(2).enumerate() {
                pairs.push(2 * j as i64);
                pairs.push(2 * j as i64 + 1);
                example_index.push(s.pair as i64);
            }
        }
    }
    out.cu_seqlens = cu;
    out.pairs = pairs;
    out.example_index = example_index;
    out.seq_lens = seq_lens;
    out.completion_lens = comp;
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Single sequences

/// Output of `pack_sequences`. 2-D arrays are row-major `[num_rows, row_len]`, flattened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PackedSequences {
    pub num_rows: usize,
    pub row_len: usize,
    pub input_ids: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub attention_mask: Vec<i8>,
    /// (S + 1,) segment boundaries in the flattened layout (a row's trailing padding in its last
    /// sequence).
    pub cu_seqlens: Vec<i32>,
    /// (S,) original index of each placed sequence, in output order.
    pub example_index: Vec<i64>,
    /// (S,) real tokens of each placed sequence (after truncation).
    pub seq_lens: Vec<i32>,
    /// Longest segment of `cu_seqlens` (padding included).
    pub max_seqlen: usize,
    /// Sequences the truncation policy shortened to `max_tokens` (0 with `Truncation::Error`).
    pub num_truncated: usize,
}

/// The part of a sequence of `len` tokens that the policy keeps: `(start, kept_len)`. `KeepStart`
/// keeps the first `max_tokens` tokens, `KeepEnd` the last; `Error` keeps everything (the caller
/// checks `kept_len > max_tokens` itself).
pub fn fit_sequence(len: usize, max_tokens: usize, policy: Truncation) -> (usize, usize) {
    if policy == Truncation::Error || len <= max_tokens {
        return (0, len);
    }
    match policy {
        Truncation::KeepStart => (0, max_tokens),
        Truncation::KeepEnd => (len - max_tokens, max_tokens),
        Truncation::Error => unreachable!(),
    }
}

/// Pack S single token sequences (each non-empty) into rows; errors (never panics) on bad options or
/// data.
///
/// The single-sequence twin of `pack`, with the same options and the same layout rules minus the
/// labels: a sequence longer than `max_tokens` is truncated by `opts.truncation` (`fit_sequence`);
/// `Padded` gives one row per sequence in input order, `L` = the longest; `Packed` places whole
/// sequences into rows of at most `max_tokens` tokens, best-fit-decreasing (`best_fit_decreasing`:
/// longest first, ties by original index, into the open row with the least room that fits, ties by
/// the older row), `L` = the fullest row. `L` is then rounded up to `pad_to_multiple_of`. Positions
/// restart at 0 at each sequence and a row's trailing padding continues its last sequence, which
/// `cu_seqlens` counts it in.
pub fn pack_sequences<T: TokenId>(seqs: Ragged<'_, T>, opts: &PackOptions) -> Result<PackedSequences, PackError> {
    let limit = validate_options(opts)?;
    let n = seqs.validate_offsets("sequences")?;
    if n as u64 >= ID_LIMIT as u64 {
        return Err(PackError::new(format!("too many sequences for int32 cu_seqlens: {n}")));
    }
    let m = opts.max_tokens;
    let mut kept: Vec<(usize, usize)> = try_with_capacity(n, "per-sequence plan")?;
    let mut lens: Vec<usize> = try_with_capacity(n, "per-sequence plan")?;
    let mut num_truncated = 0usize;
    for i in 0..n {
        let s = seqs.seq(i);
        if s.is_empty() {
            return Err(PackError::new(format!(
                "sequences[{i}] is empty: every sequence needs at least one token"
            )));
        }
        check_ids("sequences", i, s, limit, opts.vocab_size)?;
        let (start, len) = fit_sequence(s.len(), m, opts.truncation);
        if len > m {
            return Err(PackError::new(format!(
                "sequences[{i}] has {len} tokens but max_tokens is {m}; use truncation='keep_start' or \
                 'keep_end', or raise max_tokens"
            )));
        }
        num_truncated += usize::from(len != s.len());
        kept.push((start, len));
        lens.push(len);
    }

    // Plan: the sequences of every row, in order.
    let (order, row_starts): (Vec<u32>, Vec<usize>) = match opts.mode {
        Mode::Padded => ((0..n as u32).collect(), (0..=n).collect()),
        Mode::Packed => best_fit_decreasing(&lens, m),
    };
    let num_rows = row_starts.len() - 1;
    let fullest = (0..num_rows)
        .map(|r| order[row_starts[r]..row_starts[r + 1]].iter().map(|&i| lens[i as usize]).sum::<usize>())
        .max()
        .unwrap_or(0);
    let row_len = round_row_len(fullest, opts.pad_to_multiple_of);
    let slots = check_slots(num_rows, row_len, "sequences")?;
    let mut out = PackedSequences {
        num_rows,
        row_len,
        input_ids: try_zeroed(slots, "input_ids")?,
        position_ids: try_zeroed(slots, "position_ids")?,
        attention_mask: try_zeroed(slots, "attention_mask")?,
        num_truncated,
        ..Default::default()
    };
    let pad = opts.pad_token_id as i32;
    let bufs = (out.input_ids.as_mut_slice(), out.position_ids.as_mut_slice(), out.attention_mask.as_mut_slice());
    for_each_row(bufs, num_rows, row_len, |r, (ids, pos, mask)| {
        let mut at = 0usize;
        let mut last_len = 0usize;
        for &i in &order[row_starts[r]..row_starts[r + 1]] {
            let (start, len) = kept[i as usize];
            write_ids(&mut ids[at..at + len], &seqs.seq(i as usize)[start..start + len]);
            write_positions(&mut pos[at..at + len], 0);
            mask[at..at + len].fill(1);
            at += len;
            last_len = len;
        }
        pad_row_tail(ids, pos, at, last_len, pad);
    });
    let (cu, max_seqlen) = segments(num_rows, row_len, &row_starts, |k| lens[order[k] as usize])?;
    let mut example_index = try_with_capacity(n, "example_index")?;
    let mut seq_lens = try_with_capacity(n, "seq_lens")?;
    for &i in &order {
        example_index.push(i as i64);
        seq_lens.push(lens[i as usize] as i32);
    }
    out.cu_seqlens = cu;
    out.example_index = example_index;
    out.seq_lens = seq_lens;
    out.max_seqlen = max_seqlen;
    Ok(out)
}

#[cfg(test)]
#[path = "pack_tests.rs"]
mod tests;
