//! `kubectl clustered`: a kubectl plugin (kubectl runs `kubectl-clustered`
//! from PATH). `kubectl clustered ls [NAME]` shows a ClusteredService's
//! pods and workers as `pm2 ls` shows processes, read from the CR's status:
//! it needs `get` (and `watch` for `-w`) on clusteredservices, and nothing
//! else, so it works with the rights of whoever can `kubectl get csvc`.

mod render;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clustered_api::table::{Output, colour_wanted, separator};
use clustered_api::v1alpha1::ClusteredService;
use futures::{StreamExt, TryStreamExt};
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config, ResourceExt};

#[derive(Parser, Debug)]
#[command(name = "kubectl clustered", version, about = "Shows ClusteredServices the way pm2 shows processes.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// One row per pod and worker: state, pid, restarts, time in that
    /// state, CPU, memory and how its last process ended.
    Ls(LsArgs),
}

#[derive(Parser, Debug)]
struct LsArgs {
    /// The ClusteredService; all of the namespace's when left out.
    name: Option<String>,
    /// Namespace; the kubeconfig context's when left out.
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// The kubeconfig context to use.
    #[arg(long)]
    context: Option<String>,
    /// `table`, or the statuses as `json` or `yaml`.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Watch: print again on every change of the status.
    #[arg(short = 'w', long)]
    watch: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Command::Ls(args) = Cli::parse().command;
    match ls(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kubectl clustered ls: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn ls(args: &LsArgs) -> anyhow::Result<()> {
    let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
    let config = match Kubeconfig::read() {
        Ok(kubeconfig) => Config::from_custom_kubeconfig(kubeconfig, &options).await?,
        // No kubeconfig: in a pod, its service account.
        Err(_) => Config::infer().await?,
    };
    let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let api: Api<ClusteredService> = Api::namespaced(Client::try_from(config)?, &namespace);
    let terminal = std::io::stdout().is_terminal();
    let colour = colour_wanted(terminal);
    let print = |services: &[ClusteredService], first: bool| -> anyhow::Result<bool> {
        let text = render::render(services, args.output, jiff::Timestamp::now(), colour)?;
        let separator = separator(first, args.output, terminal);
        let mut out = std::io::stdout().lock();
        // A closed pipe (`| head`) ends a watch quietly.
        Ok(write!(out, "{separator}{text}").and_then(|()| out.flush()).is_ok())
    };
    let name = args.name.as_deref().unwrap_or_default();
    let missing = || anyhow::anyhow!("clusteredservice {name:?} not found in namespace {namespace}");
    if !args.watch {
        let services = match &args.name {
            Some(name) => vec![api.get_opt(name).await?.ok_or_else(missing)?],
            None => api.list(&ListParams::default()).await?.items,
        };
        print(&services, true)?;
        return Ok(());
    }
    let selector = watcher::Config::default();
    let selector = match &args.name {
        Some(name) => selector.fields(&format!("metadata.name={name}")),
        None => selector,
    };
    let (store, writer) = reflector::store();
    let mut events = watcher(api, selector).default_backoff().reflect(writer).boxed();
    let mut first = true;
    while let Some(event) = events.try_next().await? {
        if matches!(event, watcher::Event::Init | watcher::Event::InitApply(_)) {
            continue; // print once the first list is whole
        }
        let mut services: Vec<ClusteredService> = store.state().iter().map(|s| (**s).clone()).collect();
        services.sort_by_key(|s| s.name_any());
        if services.is_empty() && args.name.is_some() {
            return Err(missing());
        }
        if !print(&services, first)? {
            return Ok(());
        }
        first = false;
    }
    Ok(())
}
