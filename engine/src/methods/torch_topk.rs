//! Which elements torch's CPU `topk(k, largest=True)` returns when several
//! equal the k-th largest. mergekit's SCE keeps `torch.topk` of the variances;
//! torch (`aten/src/ATen/native/TopKImpl.h`, `topk_impl_loop`) fills a vector of
//! (value, index) pairs and, with a comparator that puts NaN first and holds all
//! NaNs equal, runs libstdc++'s `std::partial_sort` when `k * 64 <= n`
//! (`__heap_select`: a heap of the first k, each later element strictly above
//! the heap's top replaces it) and `std::nth_element` otherwise (`__introselect`:
//! median-of-three Hoare partitions down to ranges of 3, a heap-select fallback
//! at depth `2·⌊log2 n⌋`, then an insertion sort). The first k pairs after that
//! are the result, so which equal values are kept is decided by those two
//! algorithms; this module replays them step for step (the building blocks are
//! [`super::torch_sort`]'s) and is checked against torch 2.15's own choices in
//! `torch_topk_fixtures.txt` (written by `scripts/torch_topk_fixtures.py`).
//! PyTorch's main branch has since replaced the `partial_sort` call by its own
//! loop over `std::pop_heap`/`push_heap`, which keeps other ties; the 2.15
//! wheels still keep `std::partial_sort`'s (two fixture cases tell them apart).

use super::torch_sort::{
    adjust_heap, insertion_sort, make_heap, move_median_to_first, unguarded_partition,
};

/// The indices, ascending, of the `k` elements that torch's
/// `topk(keys, k, largest=True)` returns. Keys compare as u32, which orders
/// [`super::select::magnitude_key`]s like the magnitudes; every NaN key
/// (above the key of infinity) ranks first and equals every other NaN, as in
/// torch. `k` above `keys.len()` keeps everything.
pub fn topk_largest(keys: &[u32], k: usize) -> Vec<u32> {
    let n = keys.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut pairs: Vec<(u32, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &key)| (key.min(NAN_KEY), i as u32))
        .collect();
    let comp = |a: &(u32, u32), b: &(u32, u32)| a.0 > b.0;
    if k * 64 <= n {
        heap_select(&mut pairs, k, &comp);
    } else {
        nth_element(&mut pairs, k - 1, &comp);
    }
    let mut kept: Vec<u32> = pairs[..k].iter().map(|&(_, i)| i).collect();
    kept.sort_unstable();
    kept
}

/// The one key every NaN magnitude is read as (keys above infinity's are NaNs).
const NAN_KEY: u32 = 0x7f80_0001;

/// libstdc++'s `std::__heap_select(first, first + middle, last)`: the first
/// `middle` elements end up holding the `middle` first in `comp`'s order.
fn heap_select<T: Copy>(a: &mut [T], middle: usize, comp: &impl Fn(&T, &T) -> bool) {
    make_heap(&mut a[..middle], comp);
    for i in middle..a.len() {
        if comp(&a[i], &a[0]) {
            // __pop_heap(first, middle, i)
            let v = a[i];
            a[i] = a[0];
            adjust_heap(&mut a[..middle], 0, middle, v, comp);
        }
    }
}

/// libstdc++'s `std::nth_element` (`__introselect`).
fn nth_element<T: Copy>(a: &mut [T], nth: usize, comp: &impl Fn(&T, &T) -> bool) {
    let n = a.len();
    if nth >= n {
        return;
    }
    let (mut first, mut last) = (0usize, n);
    let mut depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    while last - first > 3 {
        if depth == 0 {
            heap_select(&mut a[first..last], nth + 1 - first, comp);
            a.swap(first, nth);
            return;
        }
        depth -= 1;
        let mid = first + (last - first) / 2;
        move_median_to_first(a, first, first + 1, mid, last - 1, comp);
        let cut = unguarded_partition(a, first + 1, last, first, comp);
        if cut <= nth {
            first = cut;
        } else {
            last = cut;
        }
    }
    insertion_sort(a, first, last, comp);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One case of `torch_topk_fixtures.txt` (written by
    /// `scripts/torch_topk_fixtures.py`): magnitude keys, k, and the indices
    /// torch kept.
    struct Case {
        keys: Vec<u32>,
        k: usize,
        kept: Vec<u32>,
    }

    /// Four lines a case: `n k`; the distinct keys in hex; one code per element
    /// (a character of [`CODES`], or `*` and decimal indices); the kept indices
    /// as a hex bitmask, four elements a digit, lowest bit first.
    fn fixtures() -> Vec<Case> {
        const CODES: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        let text = include_str!("torch_topk_fixtures.txt");
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let mut cases = Vec::new();
        while let Some(head) = lines.next() {
            let (n, k) = head.split_once(' ').unwrap();
            let (n, k): (usize, usize) = (n.parse().unwrap(), k.parse().unwrap());
            let distinct: Vec<u32> = lines
                .next()
                .unwrap()
                .split_whitespace()
                .map(|h| u32::from_str_radix(h, 16).unwrap())
                .collect();
            let codes = lines.next().unwrap();
            let keys: Vec<u32> = match codes.strip_prefix("* ") {
                Some(list) => list
                    .split_whitespace()
                    .map(|c| distinct[c.parse::<usize>().unwrap()])
                    .collect(),
                None => codes
                    .chars()
                    .map(|c| distinct[CODES.find(c).unwrap()])
                    .collect(),
            };
            let kept: Vec<u32> = lines
                .next()
                .unwrap()
                .chars()
                .enumerate()
                .flat_map(|(d, c)| {
                    let bits = c.to_digit(16).unwrap();
                    (0..4u32)
                        .filter(move |b| bits >> b & 1 == 1)
                        .map(move |b| 4 * d as u32 + b)
                })
                .collect();
            assert_eq!(
                (keys.len(), kept.len()),
                (n, k),
                "fixture case {}",
                cases.len()
            );
            cases.push(Case { keys, k, kept });
        }
        cases
    }

    #[test]
    fn keeps_what_torch_topk_keeps() {
        let cases = fixtures();
        assert!(cases.len() >= 100, "{} fixture cases", cases.len());
        // Both of torch's algorithms are exercised, with ties that matter.
        assert!(cases.iter().any(|c| c.k * 64 <= c.keys.len()));
        assert!(cases.iter().any(|c| c.k * 64 > c.keys.len()));
        let mut tie_decided = 0;
        for (i, c) in cases.iter().enumerate() {
            let got = topk_largest(&c.keys, c.k);
            assert_eq!(got, c.kept, "case {i}: n {} k {}", c.keys.len(), c.k);
            // A case where keeping the lowest (or highest) tied indices would
            // differ from torch proves the replay, not just the threshold.
            let mut by_index: Vec<u32> = (0..c.keys.len() as u32).collect();
            by_index.sort_by_key(|&j| std::cmp::Reverse(c.keys[j as usize].min(NAN_KEY)));
            let mut lowest = by_index[..c.k].to_vec();
            lowest.sort_unstable();
            tie_decided += (lowest != c.kept) as usize;
        }
        assert!(tie_decided >= 50, "{tie_decided} cases decided by ties");
    }

    #[test]
    fn small_cases_by_hand() {
        // torch.topk(torch.ones(17), 3): nth_element leaves 10, 11, 12 in front.
        assert_eq!(topk_largest(&[1; 17], 3), vec![10, 11, 12]);
        // torch.topk(torch.ones(200), 3): partial_sort keeps the first three.
        assert_eq!(topk_largest(&[1; 200], 3), vec![0, 1, 2]);
        // NaN (any payload) ranks above infinity; k past n keeps everything.
        let inf = f32::INFINITY.to_bits();
        assert_eq!(
            topk_largest(&[inf, 0x7fc0_0000, 5, 0x7f80_0002], 2),
            vec![1, 3]
        );
        assert_eq!(topk_largest(&[3, 1, 2], 5), vec![0, 1, 2]);
        assert!(topk_largest(&[3, 1, 2], 0).is_empty());
    }

    #[test]
    fn heap_fallback_of_introselect_selects() {
        // Depth 0 from the start: heap_select on the whole range.
        let mut v: Vec<(u32, u32)> = (0..50u32).map(|i| ((i * 37) % 11, i)).collect();
        let comp = |a: &(u32, u32), b: &(u32, u32)| a.0 > b.0;
        let mut w = v.clone();
        heap_select(&mut w, 20, &comp);
        w.swap(0, 19);
        let mut sorted = v.clone();
        sorted.sort_by_key(|p| std::cmp::Reverse(p.0));
        let threshold = sorted[19].0;
        assert!(w[..20].iter().all(|p| p.0 >= threshold));
        assert!(w[20..].iter().all(|p| p.0 <= threshold));
        nth_element(&mut v, 19, &comp);
        assert_eq!(v[19].0, threshold);
    }
}
