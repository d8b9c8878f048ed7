//! `${VAR}` in source settings (HTTP headers, Kafka client settings), read from the ingestor's
//! environment so secrets stay out of pipeline specs.

/// `template` with every `${VAR}` replaced by the variable's value; errors name `field`.
pub fn expand(field: &str, template: &str) -> Result<String, String> {
    let mut value = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("{field}: unclosed `${{`"))?;
        let var = &after[..end];
        let resolved = std::env::var(var)
            .map_err(|_| format!("{field}: ${{{var}}} is not set on the ingestor"))?;
        value.push_str(&resolved);
        rest = &after[end + 1..];
    }
    value.push_str(rest);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::expand;

    #[test]
    fn expands_variables_and_names_the_field_on_errors() {
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(expand("h", "x ${PATH} y").unwrap(), format!("x {path} y"));
        assert_eq!(expand("h", "plain").unwrap(), "plain");
        assert!(
            expand("http.headers.A", "${MEDALLION_SURELY_UNSET_VAR}")
                .unwrap_err()
                .starts_with("http.headers.A: ${MEDALLION_SURELY_UNSET_VAR} is not set")
        );
        assert!(expand("k", "${OPEN").unwrap_err().contains("unclosed"));
    }
}
