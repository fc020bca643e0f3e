# The seed's demo app: Node.js with examples/app/server.js at /app.
#   docker build -f images/demo-app.Dockerfile -t clustered.dev/demo-app:dev .
FROM node:20-bookworm-slim
COPY examples/app/ /app/
USER 65532:65532
ENTRYPOINT ["node", "/app/server.js"]
