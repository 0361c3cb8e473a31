pub fn run(_lint: bool) -> anyhow::Result<()> {
    Ok(())
}
