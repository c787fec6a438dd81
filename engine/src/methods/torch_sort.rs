//! The order in which torch's CPU `sort`/`argsort` (non-stable) leaves equal
//! keys. torch sorts (key, index) pairs with libstdc++'s `std::sort` — introsort
//! with median-of-three pivots, unguarded Hoare partitions, a heapsort fallback
//! and a final insertion sort — so which of several equal magnitudes mergekit
//! keeps at a top-k cut-off is decided by that algorithm. Reproducing it step for
//! step makes our selections on small tensors identical to mergekit's (checked
//! against torch 2.15 on random inputs with many ties).

/// Indices of `keys` in the order torch's `argsort(descending=True)` returns
/// them (keys compare as u32, which orders non-negative floats by value).
pub fn argsort_descending(keys: &[u32]) -> Vec<u32> {
    let mut pairs: Vec<(u32, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    std_sort(&mut pairs, &|a: &(u32, u32), b: &(u32, u32)| a.0 > b.0);
    pairs.into_iter().map(|(_, i)| i).collect()
}

/// Indices in the order of torch's `sort(descending=False)`.
pub fn argsort_ascending(keys: &[u32]) -> Vec<u32> {
    let mut pairs: Vec<(u32, u32)> = keys
        .iter()
        .enumerate()
        .map(|(i, &k)| (k, i as u32))
        .collect();
    std_sort(&mut pairs, &|a: &(u32, u32), b: &(u32, u32)| a.0 < b.0);
    pairs.into_iter().map(|(_, i)| i).collect()
}

const THRESHOLD: usize = 16;

/// libstdc++'s `std::sort`.
pub fn std_sort<T: Copy>(a: &mut [T], comp: &impl Fn(&T, &T) -> bool) {
    let n = a.len();
    if n < 2 {
        return;
    }
    let depth = 2 * (usize::BITS - 1 - n.leading_zeros()) as usize;
    introsort_loop(a, 0, n, depth, comp);
    if n > THRESHOLD {
        insertion_sort(a, 0, THRESHOLD, comp);
        for i in THRESHOLD..n {
            unguarded_linear_insert(a, i, comp);
        }
    } else {
        insertion_sort(a, 0, n, comp);
    }
}

fn introsort_loop<T: Copy>(
    a: &mut [T],
    first: usize,
    mut last: usize,
    mut depth: usize,
    comp: &impl Fn(&T, &T) -> bool,
) {
    while last - first > THRESHOLD {
        if depth == 0 {
            heap_sort(&mut a[first..last], comp);
            return;
        }
        depth -= 1;
        let mid = first + (last - first) / 2;
        move_median_to_first(a, first, first + 1, mid, last - 1, comp);
        let cut = unguarded_partition(a, first + 1, last, first, comp);
        introsort_loop(a, cut, last, depth, comp);
        last = cut;
    }
}

pub(super) fn move_median_to_first<T: Copy>(
    a: &mut [T],
    result: usize,
    x: usize,
    y: usize,
    z: usize,
    comp: &impl Fn(&T, &T) -> bool,
) {
    let pick = if comp(&a[x], &a[y]) {
        if comp(&a[y], &a[z]) {
            y
        } else if comp(&a[x], &a[z]) {
            z
        } else {
            x
        }
    } else if comp(&a[x], &a[z]) {
        x
    } else if comp(&a[y], &a[z]) {
        z
    } else {
        y
    };
    a.swap(result, pick);
}

pub(super) fn unguarded_partition<T: Copy>(
    a: &mut [T],
    mut first: usize,
    mut last: usize,
    pivot: usize,
    comp: &impl Fn(&T, &T) -> bool,
) -> usize {
    loop {
        while comp(&a[first], &a[pivot]) {
            first += 1;
        }
        last -= 1;
        while comp(&a[pivot], &a[last]) {
            last -= 1;
        }
        if first >= last {
            return first;
        }
        a.swap(first, last);
        first += 1;
    }
}

pub(super) fn insertion_sort<T: Copy>(
    a: &mut [T],
    first: usize,
    last: usize,
    comp: &impl Fn(&T, &T) -> bool,
) {
    for i in first + 1..last {
        let v = a[i];
        if comp(&v, &a[first]) {
            a.copy_within(first..i, first + 1);
            a[first] = v;
        } else {
            unguarded_linear_insert(a, i, comp);
        }
    }
}

fn unguarded_linear_insert<T: Copy>(a: &mut [T], mut last: usize, comp: &impl Fn(&T, &T) -> bool) {
    let v = a[last];
    while comp(&v, &a[last - 1]) {
        a[last] = a[last - 1];
        last -= 1;
    }
    a[last] = v;
}

/// `std::partial_sort(first, last, last)`: make_heap, then sort_heap.
fn heap_sort<T: Copy>(a: &mut [T], comp: &impl Fn(&T, &T) -> bool) {
    make_heap(a, comp);
    let mut last = a.len();
    while last > 1 {
        last -= 1;
        let v = a[last];
        a[last] = a[0];
        adjust_heap(&mut a[..last], 0, last, v, comp);
    }
}

/// libstdc++'s `std::__make_heap`.
pub(super) fn make_heap<T: Copy>(a: &mut [T], comp: &impl Fn(&T, &T) -> bool) {
    let len = a.len();
    if len < 2 {
        return;
    }
    let mut parent = (len - 2) / 2;
    loop {
        let v = a[parent];
        adjust_heap(a, parent, len, v, comp);
        if parent == 0 {
            return;
        }
        parent -= 1;
    }
}

/// libstdc++'s `std::__adjust_heap` (sift the hole at `hole` down to a leaf,
/// then push `v` up from there).
pub(super) fn adjust_heap<T: Copy>(
    a: &mut [T],
    mut hole: usize,
    len: usize,
    v: T,
    comp: &impl Fn(&T, &T) -> bool,
) {
    let top = hole;
    let mut child = hole;
    while child < (len.saturating_sub(1)) / 2 {
        child = 2 * (child + 1);
        if comp(&a[child], &a[child - 1]) {
            child -= 1;
        }
        a[hole] = a[child];
        hole = child;
    }
    if len & 1 == 0 && len >= 2 && child == (len - 2) / 2 {
        child = 2 * (child + 1);
        a[hole] = a[child - 1];
        hole = child - 1;
    }
    // push_heap
    let mut parent = hole.wrapping_sub(1) / 2;
    while hole > top && comp(&a[parent], &v) {
        a[hole] = a[parent];
        hole = parent;
        parent = hole.wrapping_sub(1) / 2;
    }
    a[hole] = v;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_keys_follow_libstdcxx_introsort() {
        // torch.argsort(torch.ones(17), descending=True) on torch 2.15:
        let got = argsort_descending(&[7u32; 17]);
        assert_eq!(
            got,
            vec![8, 16, 15, 14, 13, 12, 11, 10, 9, 0, 7, 6, 5, 4, 3, 2, 1]
        );
        // Up to 16 elements insertion sort keeps the input order.
        assert_eq!(
            argsort_descending(&[1u32; 16]),
            (0..16).collect::<Vec<u32>>()
        );
    }

    #[test]
    fn sorts_like_a_sort() {
        let mut x = 987654321u64;
        for n in [2usize, 17, 100, 1000, 5000] {
            let keys: Vec<u32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 50) as u32
                })
                .collect();
            let d = argsort_descending(&keys);
            assert!(d
                .windows(2)
                .all(|w| keys[w[0] as usize] >= keys[w[1] as usize]));
            let a = argsort_ascending(&keys);
            assert!(a
                .windows(2)
                .all(|w| keys[w[0] as usize] <= keys[w[1] as usize]));
            let mut seen = d.clone();
            seen.sort();
            assert_eq!(seen, (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn heap_fallback_sorts() {
        let mut v: Vec<(u32, u32)> = (0..100u32).map(|i| ((i * 37) % 11, i)).collect();
        heap_sort(&mut v, &|a: &(u32, u32), b: &(u32, u32)| a.0 < b.0);
        assert!(v.windows(2).all(|w| w[0].0 <= w[1].0));
    }
}
