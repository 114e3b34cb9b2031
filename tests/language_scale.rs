//! `language` backend: thousands of functions deployed at once.

use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartRequest};

/// The `language` backend with one worker.
fn one_worker() -> Box<dyn Backend> {
    let config = Config {
        language: microfaas::LanguageConfig {
            workers: Some(1),
            ..Default::default()
        },
        ..Config::default()
    };
    microfaas::open(BackendKind::Language, config).unwrap()
}

#[test]
fn two_thousand_functions_deployed_at_once_all_answer() {
    let b = one_worker();
    let echo = microfaas::builtin("echo").unwrap();
    let noop = microfaas::builtin("noop").unwrap();
    let ids: Vec<_> = (0..2000)
        .map(|i| {
            let artifact = if i % 2 == 0 { echo.clone() } else { noop.clone() };
            b.deploy(&FunctionSpec::new(format!("f{i}"), artifact)).unwrap()
        })
        .collect();
    assert_eq!(b.stats().functions, 2000);
    for (i, id) in ids.iter().enumerate() {
        let input = format!("function {i}");
        let out = b.invoke(id, input.as_bytes(), StartRequest::Auto).unwrap();
        assert_eq!(out.start, microfaas::StartPath::Warm);
        if i % 2 == 0 {
            assert_eq!(out.output, input.as_bytes(), "f{i}");
        } else {
            assert_eq!(out.output.len(), 8, "f{i}: noop returns its timestamp");
        }
    }
}

/// Functions deployed from one artifact share its loaded image in a worker;
/// evicting one leaves the others warm, and the image goes only with the last.
#[test]
fn evicting_one_of_two_functions_sharing_an_image() {
    let b = one_worker();
    let echo = microfaas::builtin("echo").unwrap();
    let a = b.deploy(&FunctionSpec::new("a", echo.clone())).unwrap();
    let c = b.deploy(&FunctionSpec::new("c", echo)).unwrap();
    let start = |id| b.invoke(id, b"x", StartRequest::Auto).unwrap().start;
    b.evict(&a).unwrap();
    assert_eq!(start(&c), microfaas::StartPath::Warm);
    assert_eq!(start(&a), microfaas::StartPath::Cold);
    assert_eq!(
        start(&a),
        microfaas::StartPath::Warm,
        "made resident again after the cold start"
    );
    b.evict(&a).unwrap();
    b.evict(&c).unwrap();
    assert_eq!(start(&c), microfaas::StartPath::Cold);
    assert_eq!(start(&c), microfaas::StartPath::Warm);
    assert_eq!(start(&a), microfaas::StartPath::Cold);
}
