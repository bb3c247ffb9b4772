//! `node`: runs a Tributary edge or cloud node, and manages the cluster's
//! certificates. See `node --help`.

fn main() -> anyhow::Result<()> {
    tributary_node::run_cli(None)
}
