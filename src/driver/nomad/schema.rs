//! HCL specifications of the plugin's `config` block (ConfigSchema) and of a task's `config`
//! block (TaskConfigSchema).
//!
//! Nomad decodes both blocks with these specs and sends the result as cty MessagePack, so the
//! attribute names here are the keys the config decoder reads. The attributes of Nomad's
//! built-in `qemu` driver (`drivers/qemu/driver.go`, `configSpec` and `taskConfigSpec`) keep
//! their names, types and required flags, so its jobs and plugin blocks work unchanged.

use std::collections::HashMap;

use super::proto::hclspec::{spec::Block as SpecBlock, Attr, Object, Spec};

/// Spec of the agent's `plugin "…" { config { … } }` block.
pub fn config_spec() -> Spec {
    object([
        ("image_paths", attr("image_paths", "list(string)", false)),
        (
            "args_allowlist",
            attr("args_allowlist", "list(string)", false),
        ),
        (
            "emulators_allowlist",
            attr("emulators_allowlist", "list(string)", false),
        ),
    ])
}

/// Spec of a task's `config { … }` block.
pub fn task_config_spec() -> Spec {
    object([
        ("image_path", attr("image_path", "string", true)),
        ("emulator", attr("emulator", "string", false)),
        ("machine_type", attr("machine_type", "string", false)),
        ("drive_interface", attr("drive_interface", "string", false)),
        ("accelerator", attr("accelerator", "string", false)),
        (
            "graceful_shutdown",
            attr("graceful_shutdown", "bool", false),
        ),
        ("guest_agent", attr("guest_agent", "bool", false)),
        ("args", attr("args", "list(string)", false)),
        // A list because `port_map { http = 80 }` block syntax arrives as a list of objects.
        ("port_map", attr("port_map", "list(map(number))", false)),
        // Options of this driver only. A duration string such as "45s".
        ("boot_timeout", attr("boot_timeout", "string", false)),
        // MiB of memory for QEMU itself, on top of the guest's.
        ("memory_overhead", attr("memory_overhead", "number", false)),
    ])
}

fn object<const N: usize>(attributes: [(&str, Spec); N]) -> Spec {
    let attributes: HashMap<String, Spec> = attributes
        .into_iter()
        .map(|(name, spec)| (name.to_owned(), spec))
        .collect();
    Spec {
        block: Some(SpecBlock::Object(Object { attributes })),
    }
}

/// Builds an attribute spec. The name is always set, because Nomad passes the implied name
/// from an `Object` key only to direct children, not to the children of a `Default`.
fn attr(name: &str, hcl_type: &str, required: bool) -> Spec {
    Spec {
        block: Some(SpecBlock::Attr(Attr {
            name: name.to_owned(),
            r#type: hcl_type.to_owned(),
            required,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::{PLUGIN_OPTIONS, TASK_OPTIONS};
    use super::super::proto::hclspec::{Default, Literal};
    use super::*;

    /// Checks the rules Nomad's spec conversion enforces (or crashes on) and returns the
    /// problems found, each with the path of the offending spec.
    fn conversion_problems(spec: &Spec, path: &str, implied_name: bool) -> Vec<String> {
        let mut problems = Vec::new();
        match &spec.block {
            None => problems.push(format!("{path}: spec without a block")),
            Some(SpecBlock::Object(object)) => {
                for (key, child) in &object.attributes {
                    problems.extend(conversion_problems(child, &format!("{path}.{key}"), true));
                }
            }
            Some(SpecBlock::Attr(attr)) => {
                if attr.name.is_empty() && !implied_name {
                    problems.push(format!("{path}: attr without a name"));
                }
                if attr.r#type.is_empty() {
                    problems.push(format!("{path}: attr without a type"));
                }
            }
            Some(SpecBlock::Default(default)) => {
                match &default.primary {
                    Some(primary) => problems.extend(conversion_problems(
                        primary,
                        &format!("{path}.primary"),
                        false,
                    )),
                    None => problems.push(format!("{path}: default without primary")),
                }
                match &default.default {
                    Some(fallback) => problems.extend(conversion_problems(
                        fallback,
                        &format!("{path}.default"),
                        false,
                    )),
                    None => problems.push(format!("{path}: default without fallback")),
                }
            }
            Some(SpecBlock::Literal(literal)) => {
                if literal.value.is_empty() {
                    problems.push(format!("{path}: empty literal"));
                }
            }
            Some(other) => problems.push(format!("{path}: unexpected spec kind {other:?}")),
        }
        problems
    }

    fn attributes(spec: &Spec) -> &HashMap<String, Spec> {
        match &spec.block {
            Some(SpecBlock::Object(object)) => &object.attributes,
            other => panic!("root spec is not an object: {other:?}"),
        }
    }

    fn attr_of(spec: &Spec) -> &Attr {
        match &spec.block {
            Some(SpecBlock::Attr(attr)) => attr,
            other => panic!("not an attr: {other:?}"),
        }
    }

    /// Attributes of the built-in qemu driver: name, HCL type, required.
    const BUILT_IN_TASK_ATTRS: [(&str, &str, bool); 9] = [
        ("image_path", "string", true),
        ("emulator", "string", false),
        ("machine_type", "string", false),
        ("drive_interface", "string", false),
        ("accelerator", "string", false),
        ("graceful_shutdown", "bool", false),
        ("guest_agent", "bool", false),
        ("args", "list(string)", false),
        ("port_map", "list(map(number))", false),
    ];

    const BUILT_IN_CONFIG_ATTRS: [(&str, &str, bool); 3] = [
        ("image_paths", "list(string)", false),
        ("args_allowlist", "list(string)", false),
        ("emulators_allowlist", "list(string)", false),
    ];

    /// Checks that `spec` has every attribute of `expected` with its name, type and required
    /// flag.
    fn assert_attrs(spec: &Spec, expected: &[(&str, &str, bool)]) {
        let attributes = attributes(spec);
        for &(name, hcl_type, required) in expected {
            let child = attributes
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            let attr = attr_of(child);
            assert_eq!(attr.name, name);
            assert_eq!(attr.r#type, hcl_type, "type of {name}");
            assert_eq!(attr.required, required, "required flag of {name}");
        }
    }

    #[test]
    fn task_spec_keeps_built_in_attrs() {
        assert_attrs(&task_config_spec(), &BUILT_IN_TASK_ATTRS);
    }

    #[test]
    fn config_spec_keeps_built_in_attrs() {
        let spec = config_spec();
        assert_eq!(attributes(&spec).len(), BUILT_IN_CONFIG_ATTRS.len());
        assert_attrs(&spec, &BUILT_IN_CONFIG_ATTRS);
    }

    #[test]
    fn spec_keys_match_decoder_options() {
        let task_spec = task_config_spec();
        let plugin_spec = config_spec();
        let mut task_keys: Vec<&str> = attributes(&task_spec).keys().map(String::as_str).collect();
        task_keys.sort_unstable();
        assert_eq!(task_keys, TASK_OPTIONS);

        let mut plugin_keys: Vec<&str> = attributes(&plugin_spec)
            .keys()
            .map(String::as_str)
            .collect();
        plugin_keys.sort_unstable();
        assert_eq!(plugin_keys, PLUGIN_OPTIONS);
    }

    #[test]
    fn specs_pass_conversion_rules() {
        for (label, spec) in [("config", config_spec()), ("task", task_config_spec())] {
            let problems = conversion_problems(&spec, label, false);
            assert!(problems.is_empty(), "{problems:#?}");
        }
    }

    #[test]
    fn conversion_check_catches_unnamed_default() {
        let unnamed = Spec {
            block: Some(SpecBlock::Attr(Attr {
                name: String::new(),
                r#type: "bool".into(),
                required: false,
            })),
        };
        let fallback = Spec {
            block: Some(SpecBlock::Literal(Literal {
                value: "false".into(),
            })),
        };
        let default = Spec {
            block: Some(SpecBlock::Default(Box::new(Default {
                primary: Some(Box::new(unnamed)),
                default: Some(Box::new(fallback)),
            }))),
        };
        let spec = object([("flag", default)]);

        let problems = conversion_problems(&spec, "root", false);
        assert_eq!(problems, ["root.flag.primary: attr without a name"]);
    }
}
