#!/bin/sh
# LocalStack ready hook: one stream per sample tenant, in the tenant's account and region.
# LocalStack puts resources in the account named by the access key ID (12 digits).
set -e
mk() { AWS_ACCESS_KEY_ID=$1 AWS_SECRET_ACCESS_KEY=test awslocal kinesis create-stream \
  --region "$2" --stream-name "$3" --shard-count "$4"; }
mk 111111111111 us-east-1 acme-events 2
mk 222222222222 eu-west-1 globex-events 1
mk 111111111111 eu-west-1 initech-events 1
