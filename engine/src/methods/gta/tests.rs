//! The family's methods by hand and by their statistics.

use super::*;
use crate::dtype::DType;
use crate::methods::testing::*;
use crate::unit::TensorParams;

fn ties(
    inputs: &[Vec<f32>],
    per: &[&[(&str, ParamValue)]],
    shared: &[(&str, ParamValue)],
) -> Vec<f32> {
    let n = inputs[0].len() as u64;
    let p = params(shared, per);
    run(&TIES, &[n], inputs, Some(inputs.len() - 1), &p).unwrap()
}

#[test]
fn ties_by_hand() {
    // base 0; deltas a = [1, -2, 3, 0.5], b = [-1, -1, 1, 0] with weights 1 and 0.5,
    // density 1 (no pruning). Weighted: a' = [1, -2, 3, 0.5], b' = [-0.5, -0.5, 0.5, 0].
    // Signs of sums: [+, -, +, +]. Element 0: only a agrees → 1/1 = 1.
    // Element 1: both → (-2 - 0.5)/(1 + 0.5) = -5/3. Element 2: (3 + 0.5)/1.5 = 7/3.
    // Element 3: b's zero never votes → 0.5/1.
    let out = ties(
        &[
            vec![1.0, -2.0, 3.0, 0.5],
            vec![-1.0, -1.0, 1.0, 0.0],
            vec![0.0; 4],
        ],
        &[
            &[("weight", num(1.0)), ("density", num(1.0))],
            &[("weight", num(0.5)), ("density", num(1.0))],
            &[],
        ],
        &[],
    );
    assert_eq!(out, vec![1.0, -2.5f32 / 1.5, 3.5f32 / 1.5, 0.5]);
}

#[test]
fn weights_scale_before_the_election() {
    // a = +1 (weight 0.1), b = -0.5 (weight 1): unweighted sum is +0.5, but the
    // weighted sum (0.1 - 0.5) is negative, so b wins: -0.5*1/1 = -0.5.
    let out = ties(
        &[vec![1.0], vec![-0.5], vec![0.0]],
        &[&[("weight", num(0.1))], &[("weight", num(1.0))], &[]],
        &[],
    );
    assert_eq!(out, vec![-0.5]);
}

#[test]
fn magnitude_pruning_keeps_top_density() {
    // density 0.5 of 4 elements → the 2 largest |delta| of each model.
    let out = ties(
        &[vec![0.1, -0.4, 0.3, 0.2], vec![0.0; 4]],
        &[&[("weight", num(1.0)), ("density", num(0.5))], &[]],
        &[],
    );
    assert_eq!(out, vec![0.0, -0.4, 0.3, 0.0]);
}

#[test]
fn zero_deltas_never_vote_and_agreeing_values_survive() {
    // Element where all deltas are zero stays at base; a single non-zero that
    // agrees with the (its own) sign is kept whole.
    let base = vec![0.25f32, 0.5];
    let a = vec![0.25f32, 0.75];
    let b = vec![0.25f32, 0.5];
    let out = ties(
        &[a, b, base],
        &[&[("weight", num(1.0))], &[("weight", num(1.0))], &[]],
        &[],
    );
    assert_eq!(out, vec![0.25, 0.75]);
}

#[test]
fn single_model_density_one_is_bit_exact() {
    let base: Vec<f32> = (0..3000).map(|i| ((i as f32) * 0.1).sin() * 0.02).collect();
    let ft: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if i % 3 == 0 {
                b
            } else {
                b + ((i as f32) * 0.7).cos() * 0.004
            }
        })
        .collect();
    for dt in [DType::BF16, DType::F32] {
        let round = |v: &Vec<f32>| -> Vec<f32> {
            let mut bytes = vec![0u8; v.len() * dt.size()];
            crate::dtype::encode_f32(dt, v, &mut bytes);
            let mut r = vec![0f32; v.len()];
            crate::dtype::decode_f32(dt, &bytes, &mut r);
            r
        };
        let (b, x) = (round(&base), round(&ft));
        let p = params(&[], &[&[("weight", num(1.0)), ("density", num(1.0))], &[]]);
        let out = run_dtype(&TIES, &[3000], &[x.clone(), b], Some(1), &p, dt, dt).unwrap();
        assert_eq!(out, x, "{dt}");
    }
}

#[test]
fn task_arithmetic_by_hand() {
    let p = params(
        &[],
        &[&[("weight", num(1.0))], &[("weight", num(-0.5))], &[]],
    );
    let out = run(
        &TASK_ARITHMETIC,
        &[2],
        &[vec![2.0, 1.0], vec![3.0, 1.0], vec![1.0, 1.0]],
        Some(2),
        &p,
    )
    .unwrap();
    // 1 + (1·1 + (-0.5)·2) = 1, 1 + 0 = 1
    assert_eq!(out, vec![1.0, 1.0]);
    let p = TensorParams {
        shared: [("lambda".to_string(), num(2.0))].into(),
        ..params(&[], &[&[("weight", num(0.5))], &[]])
    };
    let out = run(&TASK_ARITHMETIC, &[1], &[vec![3.0], vec![1.0]], Some(1), &p).unwrap();
    assert_eq!(out, vec![3.0]); // 1 + 2·(0.5·2)
}

fn gta(
    method: &Gta,
    shape: &[u64],
    inputs: &[Vec<f32>],
    per: &[&[(&str, ParamValue)]],
    shared: &[(&str, ParamValue)],
) -> Vec<f32> {
    let mut sh: Vec<(&str, ParamValue)> = vec![
        ("normalize", flag(false)),
        ("rescale", flag(false)),
        ("lambda", num(1.0)),
    ];
    sh.extend_from_slice(shared);
    let p = params(&sh, per);
    run(method, shape, inputs, Some(inputs.len() - 1), &p).unwrap()
}

#[test]
fn breadcrumbs_drops_the_largest_and_the_smallest() {
    // n = 10, density 0.5, gamma 0.1: keep 5, drop the top 1 and the bottom 4.
    let a: Vec<f32> = (1..=10).map(|v| v as f32).collect();
    let out = gta(
        &BREADCRUMBS,
        &[10],
        &[a, vec![0.0; 10]],
        &[
            &[
                ("weight", num(1.0)),
                ("density", num(0.5)),
                ("gamma", num(0.1)),
            ],
            &[],
        ],
        &[],
    );
    assert_eq!(out, vec![0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0, 0.0]);
}

#[test]
fn dare_keeps_density_and_preserves_the_l1_norm() {
    let n = 100_000usize;
    let a: Vec<f32> = (0..n).map(|i| 0.001 + (i % 97) as f32 * 1e-4).collect();
    let out = gta(
        &DARE_LINEAR,
        &[n as u64],
        &[a.clone(), vec![0.0; n]],
        &[&[("weight", num(1.0)), ("density", num(0.3))], &[]],
        &[("rescale", flag(true))],
    );
    let kept = out.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.3).abs() < 0.01, "kept {kept}");
    let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
    assert!((l1(&out) / l1(&a) - 1.0).abs() < 1e-5);
}

#[test]
fn random_masks_do_not_depend_on_threads_and_follow_the_seed() {
    let n = 3 * CHUNK + 17;
    let a: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
    let p = params(
        &[
            ("normalize", flag(false)),
            ("rescale", flag(true)),
            ("lambda", num(1.0)),
        ],
        &[&[("weight", num(1.0)), ("density", num(0.5))], &[]],
    );
    let go = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            run(
                &DARE_TIES,
                &[n as u64],
                &[a.clone(), vec![0.0; n]],
                Some(1),
                &p,
            )
            .unwrap()
        })
    };
    let one = go(1);
    assert_eq!(one, go(4));
    let other_seed = crate::methods::testing::run_seeded(
        &DARE_TIES,
        &[n as u64],
        &[a.clone(), vec![0.0; n]],
        Some(1),
        &p,
        43,
    );
    assert_ne!(one, other_seed);
}

#[test]
fn della_keep_probability_follows_the_magnitude_rank() {
    // 4000 rows of 10: magnitudes 1..=10 in each row; density 0.5, epsilon 0.4:
    // rank r keeps with p = 0.1 + 0.8·r/9.
    let rows = 4000usize;
    let a: Vec<f32> = (0..rows * 10).map(|i| (i % 10 + 1) as f32).collect();
    let run_eps = |eps: f64| {
        gta(
            &DELLA_LINEAR,
            &[rows as u64, 10],
            &[a.clone(), vec![0.0; rows * 10]],
            &[
                &[
                    ("weight", num(1.0)),
                    ("density", num(0.5)),
                    ("epsilon", num(eps)),
                ],
                &[],
            ],
            &[],
        )
    };
    let out = run_eps(0.4);
    for r in 0..10 {
        let kept = (0..rows).filter(|row| out[row * 10 + r] != 0.0).count() as f64 / rows as f64;
        let want = 0.1 + 0.8 * r as f64 / 9.0;
        assert!(
            (kept - want).abs() < 0.03,
            "rank {r}: kept {kept}, want {want}"
        );
    }
    assert_ne!(out, run_eps(0.1), "epsilon must change the output");
    // Without epsilon every rank keeps with probability density.
    let flat = run_eps(0.0);
    let low = (0..rows).filter(|row| flat[row * 10] != 0.0).count() as f64 / rows as f64;
    assert!((low - 0.5).abs() < 0.03);
}

#[test]
fn della_ranks_equal_magnitudes_in_torchs_argsort_order() {
    // Rows of 17 equal magnitudes: mergekit ranks them with torch's argsort,
    // whose introsort leaves equal keys as [8, 16, 15, ..., 9, 0, 7, ..., 1]
    // (torch 2.15; torch_sort's test), so element 8 has rank 0 (p = 0.1),
    // element 0 rank 9 (p = 0.55) and element 1 rank 16 (p = 0.9), not the
    // ranks of their positions.
    let rows = 4000usize;
    let a = vec![1.0f32; rows * 17];
    let out = gta(
        &DELLA_LINEAR,
        &[rows as u64, 17],
        &[a, vec![0.0; rows * 17]],
        &[
            &[
                ("weight", num(1.0)),
                ("density", num(0.5)),
                ("epsilon", num(0.4)),
            ],
            &[],
        ],
        &[],
    );
    let kept =
        |e: usize| (0..rows).filter(|row| out[row * 17 + e] != 0.0).count() as f64 / rows as f64;
    for (e, rank) in [(8usize, 0usize), (16, 1), (0, 9), (1, 16)] {
        let want = 0.1 + 0.8 * rank as f64 / 16.0;
        assert!(
            (kept(e) - want).abs() < 0.03,
            "element {e}: kept {}, want {want}",
            kept(e)
        );
    }
}

#[test]
fn della_rejects_density_plus_minus_epsilon_outside_the_unit_interval() {
    let p = params(
        &[],
        &[
            &[
                ("weight", num(1.0)),
                ("density", num(0.8)),
                ("epsilon", num(0.3)),
            ],
            &[],
        ],
    );
    let problem = DELLA.validate(&p, Some(1)).unwrap_err();
    assert_eq!(problem.params, vec!["epsilon", "density"]);
    assert!(problem.message.contains("density") && problem.message.contains("epsilon"));
    let ok = params(
        &[],
        &[
            &[
                ("weight", num(1.0)),
                ("density", num(0.6)),
                ("epsilon", num(0.3)),
            ],
            &[],
        ],
    );
    assert!(DELLA.validate(&ok, Some(1)).is_ok());
}
