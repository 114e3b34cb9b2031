//! `language` backend: thousands of functions deployed at once.

use microfaas::{Backend, BackendKind, Config, FunctionSpec, StartRequest};

#[test]
fn two_thousand_functions_deployed_at_once_all_answer() {
    let config = Config {
        language: microfaas::LanguageConfig {
            workers: Some(1),
            ..Default::default()
        },
        ..Config::default()
    };
    let b: Box<dyn Backend> = microfaas::open(BackendKind::Language, config).unwrap();
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
