//! Prints the ClusteredService CRD as YAML: `cargo run -p clustered-api --bin crdgen > crds/clusteredservice.yaml`.

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", clustered_api::v1alpha1::crd_yaml()?);
    Ok(())
}
